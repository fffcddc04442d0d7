"""What lbd says about itself agrees everywhere, and its lifecycle leaves nothing behind:
- "in rotation" means one thing in `/v1/status` and `/v1/servers`;
- lbd's own refusals count as responses, in the status and in /metrics;
- removing a server never removes a newer registration of its id;
- a health checker that crashes is logged and started again;
- a start that fails after the proxy is bound closes the proxy again.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import socket
import threading

import pytest

from lbd.config import Address, Config, parse_address
from lbd.daemon import Daemon
from lbd.health.active import HealthChecker
from lbd.models import ServerSpec
from lbd.registry import Registry
from tests.harness.backends import backends
from tests.harness.clients import RawConnection, build_request, closed_port
from tests.harness.daemon import Lbd, running_lbd, short_tempdir, wait_until


def test_a_drained_server_is_out_of_rotation_in_status_and_servers(static_lbd: Lbd) -> None:
    assert static_lbd.request("POST", "/v1/servers/s2/drain")[0] == 200
    listed = sum(1 for server in static_lbd.servers().values() if server["in_rotation"])
    assert listed == 2 == static_lbd.get("/v1/status")["servers"]["in_rotation"]


def responses_metric(daemon: Lbd) -> dict[str, int]:
    text = daemon.request("GET", "/metrics")[1]
    return {k: int(float(v)) for k, v in re.findall(r'^lbd_responses_total\{class="(\dxx)"\} (\S+)$', text, re.M)}


def test_lbd_s_own_refusals_are_counted_as_responses(static_lbd: Lbd) -> None:
    status_before = static_lbd.get("/v1/status")["requests"]["responses"]["4xx"]
    metric_before = responses_metric(static_lbd)["4xx"]
    for request in (
        build_request("GET", "/" + "a" * 9000, {"client-id": "c"}),  # 414
        build_request("GET", "/x", {"client-id": "c", "X-Big": "b" * 70_000}),  # 431
        build_request("GET", "/x", {"client-id": "c"}, host=None),  # 400: no Host
    ):
        with RawConnection(static_lbd.port) as connection:
            connection.send(request)
            assert connection.read_response().status in (400, 414, 431)
    assert static_lbd.get("/v1/status")["requests"]["responses"]["4xx"] == status_before + 3
    assert responses_metric(static_lbd)["4xx"] == metric_before + 3


def test_removing_a_server_leaves_a_newer_registration_of_its_id() -> None:
    """A deregistration that waits for a request in flight does not remove the server registered
    again under that id meanwhile; it says so (409)."""
    with backends("old", "new") as (old, new), running_lbd(entries=[old.entry()]) as daemon:
        daemon_id = old.id
        slow = threading.Thread(target=daemon.proxy_get, args=("/slow/1500",), kwargs={"client": "c"})
        slow.start()
        wait_until(lambda: daemon.servers()[daemon_id]["active"] == 1)
        answers: list[tuple[int, object]] = []
        waiting = threading.Thread(target=lambda: answers.append(daemon.request("DELETE", f"/v1/servers/{daemon_id}")))
        waiting.start()
        wait_until(lambda: daemon.servers()[daemon_id]["draining"])
        assert daemon.request("DELETE", f"/v1/servers/{daemon_id}?now=true")[0] == 200
        replacement = {**new.entry(), "id": daemon_id}
        assert daemon.request("POST", "/v1/servers", replacement)[0] == 201
        waiting.join(10)
        slow.join(10)
        status, body = answers[0]
        assert status == 409 and "registered again" in str(body)
        assert daemon.servers()[daemon_id]["port"] == new.port


class CrashingOnce(HealthChecker):
    """A checker whose first probe hits a bug (an exception no probe should raise)."""

    crashed = False

    async def probe(self, server: object) -> tuple[bool, str]:  # type: ignore[override]
        if not self.crashed:
            self.crashed = True
            raise RuntimeError("a bug in the prober")
        return True, "HTTP 200"


def test_a_crashed_health_checker_is_logged_and_started_again(caplog: pytest.LogCaptureFixture) -> None:
    config = Config()
    registry = Registry(config.regions.latency_ms)
    registry.register(ServerSpec("s1", "http", "127.0.0.1", closed_port(), "us-east", 10))
    settings = config.health.__class__(interval_ms=50)

    async def run() -> int:
        checker = CrashingOnce(registry, settings)
        await checker.start()
        try:
            server = registry.get("s1")
            assert server is not None
            for _ in range(200):  # bounded: 10 s at most
                if server.state.checks_passed:
                    break
                await asyncio.sleep(0.05)
            return server.state.checks_passed
        finally:
            await checker.stop()

    with caplog.at_level(logging.ERROR, logger="lbd.health"):
        assert asyncio.run(run()) >= 1  # checked again after the crash
    assert any("health checker of server s1 crashed" in r.message and r.exc_info for r in caplog.records)


def test_a_failed_start_closes_the_proxy_it_had_bound() -> None:
    """The metrics listener's port is taken: the start fails after the proxy is bound, and the proxy's
    port is free again when `run` returns (nothing of the start is left open in the process)."""
    workdir = short_tempdir()
    proxy_port = closed_port()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = taken.getsockname()[1]
        config = Config(
            listen=Address("127.0.0.1", proxy_port),
            admin_socket=workdir / "lbd.sock",
            state_dir=workdir / "state",
            metrics_listen=parse_address(f"127.0.0.1:{busy}", "test"),
        )
        with pytest.raises(OSError, match="cannot serve metrics"):
            asyncio.run(Daemon(config, []).run())
    with socket.create_server(("127.0.0.1", proxy_port)):  # would fail (EADDRINUSE) had it been left open
        pass
    assert not (workdir / "lbd.sock").exists()
    shutil.rmtree(workdir)
