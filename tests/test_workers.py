"""`lbd start --workers N`: a supervisor and real worker processes on one port.

Each test runs a real supervisor with two workers, real backends and real clients; connections
are opened one per request, so the kernel spreads them over both workers' SO_REUSEPORT sockets.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.backends import Backend, backends
from tests.harness.cli import assert_one_line_error
from tests.harness.daemon import Lbd, running_lbd, short_tempdir, wait_until, write_servers
from tests.harness.metrics import scrape, value
from tests.harness.redis_server import redis_server

WORKERS = ["--workers", "2"]
REPLACED_WITHIN_S = 1.0  # the issue: a dead worker is replaced (its process started again) within 1 s


@pytest.fixture(scope="module")
def three() -> Iterator[list[Backend]]:
    with backends("w1", "w2", "w3") as started:
        yield started


def entries_of(backends_: list[Backend]) -> list[dict[str, object]]:
    return [backend.entry(capacity=100) for backend in backends_]


def workers_of(daemon: Lbd) -> list[dict[str, object]]:
    return list(daemon.get("/v1/status")["workers"])


def served(daemon: Lbd, client: str, path: str = "/echo") -> str:
    """One request on a connection of its own: the backend that answered."""
    status, backend, _ = daemon.proxy_get(path, client=client)
    assert status == 200
    return backend


def test_two_workers_share_the_port_and_agree_on_every_client(three: list[Backend]) -> None:
    with running_lbd(WORKERS, entries_of(three)) as daemon:
        assert len({worker["pid"] for worker in workers_of(daemon)}) == 2
        seen: dict[str, set[str]] = {}
        for _ in range(5):
            for n in range(40):
                seen.setdefault(f"c{n}", set()).add(served(daemon, f"c{n}"))
        assert all(len(servers) == 1 for servers in seen.values())  # every worker routes a client alike
        assert len({next(iter(servers)) for servers in seen.values()}) == 3
        requests = [worker["requests"] for worker in workers_of(daemon)]
        assert all(count > 0 for count in requests), requests  # the kernel gave both workers connections
        assert sum(requests) == 200 == daemon.get("/v1/status")["requests"]["total"]
        assert "lbd/w0" in daemon.log() and "lbd/w1" in daemon.log()  # each worker's lines say whose


def test_changes_reach_every_worker_before_the_answer(three: list[Backend]) -> None:
    with running_lbd(WORKERS, entries_of(three[:2])) as daemon:
        result = daemon.lbctl(
            "register", "--id", "w3", "--url", three[2].url, "--region", "us-east", "--capacity", "100"
        )
        assert result.returncode == 0, result.stderr
        assert daemon.servers()["w3"]["health_by_worker"] == ["healthy", "healthy"]  # no wait: both hold it
        clients = [f"r{n}" for n in range(60)]
        on_w3 = [client for client in clients if served(daemon, client) == "w3"]
        assert on_w3
        assert daemon.lbctl("drain", "w3").returncode == 0
        for client in on_w3 * 3:  # through both workers: none sends a new request to the drained server
            assert served(daemon, client) != "w3"
        assert daemon.lbctl("deregister", "w3", "--now").returncode == 0
        assert "w3" not in daemon.servers()
        assert daemon.lbctl("set", "capacity", "w1", "7").returncode == 0
        assert daemon.servers()["w1"]["capacity"] == 7


def test_dynamic_mode_across_workers_needs_a_shared_store(three: list[Backend], tmp_path: Path) -> None:
    config = tmp_path / "lbd.toml"
    config.write_text('mode = "dynamic"\nworkers = 2\n')
    checked = subprocess.run(
        [sys.executable, "-m", "lbd", "check-config", str(config)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 2 and checked.stdout == ""
    assert (
        checked.stderr.count("\n") == 1 and "needs the sessions shared between workers: add --cluster" in checked.stderr
    )
    with running_lbd(WORKERS, entries_of(three)) as daemon:
        refused = daemon.lbctl("mode", "dynamic")
        assert_one_line_error(refused, 5, "dynamic mode across 2 workers needs their sessions shared")
        assert daemon.get("/v1/mode")["mode"] == "static"


def test_a_killed_worker_is_replaced_while_the_port_keeps_serving(three: list[Backend]) -> None:
    with running_lbd(WORKERS, entries_of(three)) as daemon:
        victim = workers_of(daemon)[0]
        os.kill(int(victim["pid"]), signal.SIGKILL)
        replaced = wait_until(
            lambda: (w := workers_of(daemon)[0])["pid"] != victim["pid"] and w, timeout=REPLACED_WITHIN_S
        )
        statuses = Counter(daemon.proxy_get(client=f"k{n}")[0] for n in range(60))  # queued, not refused
        assert statuses == Counter({200: 60})
        wait_until(lambda: workers_of(daemon)[0]["state"] == "serving")
        assert replaced["restarts"] == 1
        assert f"worker 0 (pid {victim['pid']}) killed by SIGKILL" in daemon.log()


def test_a_replacement_worker_holds_the_runtime_state(three: list[Backend]) -> None:
    with running_lbd(WORKERS, entries_of(three[:2])) as daemon:
        register = ["register", "--id", "w3", "--url", three[2].url, "--region", "us-east", "--capacity", "100"]
        assert daemon.lbctl(*register).returncode == 0
        assert daemon.lbctl("drain", "w1").returncode == 0
        for worker in workers_of(daemon):
            os.kill(int(worker["pid"]), signal.SIGKILL)
        wait_until(lambda: all(w["state"] == "serving" and w["restarts"] == 1 for w in workers_of(daemon)))
        servers = daemon.servers()
        assert servers["w3"]["health_by_worker"] == ["healthy", "healthy"]
        assert servers["w1"]["draining"]
        assert {served(daemon, f"s{n}") for n in range(30)} <= {"w2", "w3"}


def test_sigterm_lets_every_worker_finish_and_exits_0(three: list[Backend]) -> None:
    with running_lbd(WORKERS, entries_of(three)) as daemon:
        pids = [int(worker["pid"]) for worker in workers_of(daemon)]
        answers: list[int] = []

        def slow_request() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
            connection.request("GET", "/slow/1500", headers={"client-id": "patient"})
            answers.append(connection.getresponse().status)
            connection.close()

        requester = threading.Thread(target=slow_request)
        requester.start()
        wait_until(lambda: sum(w["connections"] for w in workers_of(daemon)) == 1)
        assert daemon.stop() == 0
        requester.join(10)
        assert answers == [200]
        for pid in pids:  # no worker outlives its supervisor
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


def test_sighup_reloads_every_worker(three: list[Backend]) -> None:
    workdir = short_tempdir()
    servers_file = write_servers(workdir, entries_of(three[:2]))
    config = workdir / "lbd.toml"
    config.write_text(f'servers = "{servers_file}"\nworkers = 2\n')
    with running_lbd(["--config", str(config)]) as daemon:
        write_servers(workdir, entries_of(three))
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: "w3" in daemon.servers())
        assert daemon.servers()["w3"]["health_by_worker"] == ["healthy", "healthy"]
        assert "w3" in {served(daemon, f"h{n}") for n in range(60)}
        assert daemon.get("/v1/status")["reload"]["succeeded"] == 1


def test_metrics_are_the_sum_over_workers(three: list[Backend]) -> None:
    with running_lbd(WORKERS, entries_of(three)) as daemon:
        for n in range(50):
            served(daemon, f"m{n}")
        samples = scrape(daemon)
        assert value(samples, "lbd_requests_total") == 50
        per_worker = [value(samples, "lbd_worker_requests_total", worker=str(i)) for i in range(2)]
        assert sum(per_worker) == 50 and all(count > 0 for count in per_worker)
        assert value(samples, "lbd_workers") == 2
        assert value(samples, "lbd_servers") == 3  # the control plane's, not summed
        assert value(samples, "lbd_server_up", server="w1", region="us-east") == 1
        hits = sum(value(samples, "lbd_server_requests_total", server=b.id, region="us-east") for b in three)
        assert hits == 50


def test_dynamic_workers_share_sessions_through_the_cluster(three: list[Backend]) -> None:
    with redis_server() as store:
        name = f"t{uuid.uuid4().hex[:10]}"
        config = short_tempdir() / "lbd.toml"
        config.write_text(f'default_client_region = "us-east"\n[cluster]\nname = "{name}"\n')
        args = [*WORKERS, "--mode", "dynamic", "--config", str(config), "--cluster", store.url]
        with running_lbd(args, entries_of(three)) as daemon:
            wait_until(lambda: daemon.get("/v1/cluster")["store"] == "connected")
            seen: dict[str, set[str]] = {}
            for _ in range(4):
                for n in range(30):
                    seen.setdefault(f"d{n}", set()).add(served(daemon, f"d{n}"))
            assert all(len(servers) == 1 for servers in seen.values()), seen
            assert all(worker["requests"] > 0 for worker in workers_of(daemon))
            peers = daemon.get("/v1/cluster")["peers"]
            assert [peer["instance"] for peer in peers] == [daemon.get("/v1/cluster")["instance"]]


def test_workers_stop_by_themselves_when_their_supervisor_is_killed(three: list[Backend]) -> None:
    with running_lbd(WORKERS, entries_of(three)) as daemon:
        pids = [int(worker["pid"]) for worker in workers_of(daemon)]
        daemon.kill()

        def gone(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        wait_until(lambda: all(gone(pid) for pid in pids), timeout=15)
        assert "the supervisor is gone; stopping" in daemon.log()
