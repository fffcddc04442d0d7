"""Several lbd instances as one balancer through a real redis-server (a throwaway one, persistence
off): registrations, drain flags, the mode and sticky sessions shared; instances and Redis killed.

Each test's instances use their own cluster name (a key prefix), so tests never see each other's
state in the shared Redis; the tests that kill Redis start their own.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from lbd.config import ClusterSettings
from lbd.errors import StoreUnavailable
from lbd.store.redis_store import ClaimAnswer, RedisStore
from tests.harness.backends import Backend, backends
from tests.harness.cli import assert_one_line_error
from tests.harness.daemon import Lbd, running_lbd, short_tempdir, wait_until
from tests.harness.metrics import scrape, value
from tests.harness.redis_server import RedisServer, redis_server

SPREAD_S = 1.0  # a change made through one instance is on every other one within this (issue: 1 s)


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def three() -> Iterator[list[Backend]]:
    with backends("c1", "c2", "c3") as started:
        yield started


def cluster_config(name: str, extra: str = "") -> str:
    path = short_tempdir() / "lbd.toml"
    path.write_text(f'default_client_region = "us-east"\n{extra}\n[cluster]\nname = "{name}"\n')
    return str(path)


@contextmanager
def instances(
    redis: RedisServer, count: int = 2, entries: list[dict[str, object]] | None = None, extra: str = ""
) -> Iterator[list[Lbd]]:
    """`count` lbd instances in dynamic mode, one cluster (of a name of their own) on `redis`."""
    config = cluster_config(f"t{uuid.uuid4().hex[:10]}", extra)
    args = ["--mode", "dynamic", "--config", config, "--cluster", redis.url]
    with ExitStack() as stack:
        started = [stack.enter_context(running_lbd(args, entries)) for _ in range(count)]
        for daemon in started:
            wait_until(lambda d=daemon: d.get("/v1/cluster")["store"] == "connected")
        yield started


def ok(result: object) -> str:
    assert getattr(result, "returncode", None) == 0, getattr(result, "stderr", result)
    return str(getattr(result, "stdout", ""))


def stored_servers(redis: RedisServer, daemon: Lbd) -> set[str]:
    name = daemon.get("/v1/cluster")["name"]
    listed = redis.command("HKEYS", f"lb:{{{name}}}:servers")
    return set(listed.split("\n")) if listed else set()


def test_changes_through_any_instance_apply_on_every_instance(redis: RedisServer, three: list[Backend]) -> None:
    with instances(redis) as (a, b):
        ok(a.lbctl("register", "--id", "c1", "--url", three[0].url, "--region", "us-east", "--capacity", "10"))
        wait_until(lambda: "c1" in b.servers(), timeout=SPREAD_S)
        ok(b.lbctl("drain", "c1"))
        wait_until(lambda: a.servers()["c1"]["draining"], timeout=SPREAD_S)
        ok(b.lbctl("set", "capacity", "c1", "25"))
        wait_until(lambda: a.servers()["c1"]["capacity"] == 25, timeout=SPREAD_S)
        ok(a.lbctl("mode", "static"))
        wait_until(lambda: b.get("/v1/mode")["mode"] == "static", timeout=SPREAD_S)
        ok(b.lbctl("mode", "--from-config"))
        wait_until(lambda: a.get("/v1/mode")["mode"] == "dynamic", timeout=SPREAD_S)
        ok(a.lbctl("deregister", "c1", "--now"))
        wait_until(lambda: "c1" not in b.servers(), timeout=SPREAD_S)
        assert stored_servers(redis, a) == set()
        for daemon in (a, b):  # each instance's status names the cluster, itself and its peer
            cluster = daemon.get("/v1/status")["cluster"]
            assert cluster["store"] == "connected"
            assert {peer["instance"] for peer in cluster["peers"]} == {a.get("/v1/cluster")["instance"],
                                                                      b.get("/v1/cluster")["instance"]}  # fmt: skip
        table = ok(a.lbctl("cluster"))
        assert "connected" in table and "(this one)" in table
        assert "applied from" not in a.log()
        assert "by instance" in a.log()  # b's changes are audited on a too


def test_concurrent_registrations_through_two_instances_end_the_same(redis: RedisServer, three: list[Backend]) -> None:
    with instances(redis) as (a, b):
        errors: list[object] = []

        def burst(daemon: Lbd, prefix: str) -> None:
            for n in range(15):
                entry = {"id": f"{prefix}{n}", "url": three[n % 3].url, "region": "us-east", "capacity": 5 + n}
                status, body = daemon.request("POST", "/v1/servers", entry)
                if status not in (200, 201):
                    errors.append(body)
                # the same id through both instances at once: one wins, the other is told 409 or agrees
                shared = {"id": f"both{n}", "url": three[0].url, "region": "us-east", "capacity": 7}
                status, body = daemon.request("POST", "/v1/servers", shared)
                if status not in (200, 201):
                    errors.append(body)

        threads = [threading.Thread(target=burst, args=(d, p)) for d, p in ((a, "a"), (b, "b"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors
        expected = {f"{p}{n}" for p in "ab" for n in range(15)} | {f"both{n}" for n in range(15)}
        wait_until(lambda: set(a.servers()) == set(b.servers()) == expected, timeout=SPREAD_S)
        assert stored_servers(redis, a) == expected
        assert a.servers()["a3"]["capacity"] == b.servers()["a3"]["capacity"] == 8


def entries_of(backends_: list[Backend]) -> list[dict[str, object]]:
    return [backend.entry(capacity=100) for backend in backends_]


def test_a_client_keeps_its_server_through_any_instance(redis: RedisServer, three: list[Backend]) -> None:
    with instances(redis, entries=entries_of(three)) as (a, b):
        first = {f"k{n}": a.proxy_get(client=f"k{n}", region="us-east")[1] for n in range(40)}
        assert len(set(first.values())) > 1  # new clients spread
        for client, server in first.items():
            assert b.proxy_get(client=client, region="us-east")[1] == server  # new to b: one claim, the same pin
        assert value(scrape(a), "lbd_cluster_claims_total", result="won") == 40
        assert value(scrape(b), "lbd_cluster_claims_total", result="adopted") == 40
        assert value(scrape(b), "lbd_cluster_peers") == 2 and value(scrape(b), "lbd_cluster_store_up") == 1
        # a move made on one instance (its server drained there) is what the other follows
        moved = next(client for client, server in first.items() if server == "c1")
        ok(a.lbctl("drain", "c1"))
        new_server = a.proxy_get(client=moved, region="us-east")[1]
        assert new_server != "c1"
        wait_until(lambda: b.get(f"/v1/route/{moved}?region=us-east")["server"] == new_server, timeout=SPREAD_S)
        assert b.proxy_get(client=moved, region="us-east")[1] == new_server


def test_a_burst_of_new_clients_through_two_instances_settles_on_one_pin_each(
    redis: RedisServer, three: list[Backend]
) -> None:
    """New clients arriving together through both instances: the claims of one event-loop turn go to
    Redis in one pipeline, and each answer must reach its own client (won on one instance, adopted on
    the other, the same server through both)."""
    clients = [f"burst{n}" for n in range(48)]
    with instances(redis, entries=entries_of(three)) as (a, b):

        def route(asked: tuple[int, str]) -> str:
            instance, client = asked
            return (a, b)[instance].proxy_get(client=client, region="us-east")[1]

        asked = [(instance, client) for client in clients for instance in (0, 1)]
        with ThreadPoolExecutor(max_workers=16) as pool:
            servers = list(pool.map(route, asked))
        through: tuple[dict[str, str], dict[str, str]] = ({}, {})
        for (instance, client), server in zip(asked, servers, strict=True):
            through[instance][client] = server
        assert through[0] == through[1]
        assert len(set(through[0].values())) > 1  # new clients spread
        won = sum(value(scrape(d), "lbd_cluster_claims_total", result="won") for d in (a, b))
        adopted = sum(value(scrape(d), "lbd_cluster_claims_total", result="adopted") for d in (a, b))
        assert (won, adopted) == (len(clients), len(clients))


def test_claims_sent_together_each_get_their_own_answer(redis: RedisServer) -> None:
    """The store's batched claim against the real Redis: one pipeline, answers in the claims' order
    (None where ours took, the held pin where another was there first), and a claim Redis refuses
    (its key holds a hash) spoils no other answer."""
    store = RedisStore(ClusterSettings(url=redis.url, name=f"t{uuid.uuid4().hex[:10]}"))

    async def claim() -> tuple[list[ClaimAnswer], list[ClaimAnswer]]:
        try:
            first = await store.claim_sessions([("held", "s1|us-east")], 30)
            await store.client.hset(store.keys.session("not-a-pin"), "field", "value")
            claims = [("n1", "s2|eu"), ("held", "s3|eu"), ("not-a-pin", "s4|eu"), ("n2", "s5|eu")]
            return first, await store.claim_sessions(claims, 30)
        finally:
            await store.close()

    first, batch = asyncio.run(claim())
    assert first == [None]
    assert batch[0] is None and batch[1] == "s1|us-east" and batch[3] is None
    refused = batch[2]
    assert isinstance(refused, StoreUnavailable) and "WRONGTYPE" in str(refused)


def test_new_clients_read_in_one_loop_turn_share_one_round_trip(redis: RedisServer, three: list[Backend]) -> None:
    """Twelve keep-alive connections each send a new client's request while lbd is stopped (SIGSTOP);
    let go, lbd reads them all in one turn of its event loop, and their claims reach Redis together."""

    def ask(connection: http.client.HTTPConnection, client: str) -> None:
        connection.putrequest("GET", "/echo")
        connection.putheader("client-id", client)
        connection.putheader("client-region", "us-east")
        connection.endheaders()

    with instances(redis, count=1, entries=entries_of(three)) as (daemon,):
        connections = [http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10) for _ in range(12)]
        for n, connection in enumerate(connections):  # connected, each with a first request answered
            ask(connection, f"before{n}")
            first = connection.getresponse()
            first.read()
            assert first.status == 200
        before = value(scrape(daemon), "lbd_cluster_claim_round_trips_total")
        daemon.signal(signal.SIGSTOP)
        try:
            for n, connection in enumerate(connections):
                ask(connection, f"together{n}")
        finally:
            daemon.signal(signal.SIGCONT)
        statuses = []
        for connection in connections:
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
            connection.close()
        assert statuses == [200] * 12
        assert value(scrape(daemon), "lbd_cluster_claims_total", result="won") == 24
        assert value(scrape(daemon), "lbd_cluster_claim_round_trips_total") - before <= 2  # not one each


def test_killing_an_instance_loses_no_session(redis: RedisServer, three: list[Backend]) -> None:
    with instances(redis, entries=entries_of(three)) as (a, b):
        pinned = {f"p{n}": a.proxy_get(client=f"p{n}", region="us-east")[1] for n in range(30)}
        name = a.get("/v1/cluster")["name"]
        wait_until(lambda: all(redis.command("GET", f"lb:{name}:s:{client}") for client in pinned))
        a.kill()
        for client, server in pinned.items():
            assert b.proxy_get(client=client, region="us-east")[1] == server


def test_sliding_expiry_counts_requests_on_every_instance(redis: RedisServer, three: list[Backend]) -> None:
    """Idle timeout 3 s: a client that keeps using instance a for longer than that is still pinned
    when it first reaches b (a refreshed the store's expiry)."""
    with instances(redis, entries=entries_of(three), extra="session_idle_timeout = 3") as (a, b):
        server = a.proxy_get(client="slider", region="us-east")[1]
        name = a.get("/v1/cluster")["name"]
        key = f"lb:{name}:s:slider"
        first_ttl = int(redis.command("TTL", key) or 0)
        assert 0 < first_ttl <= 4
        for _ in range(12):  # bounded: 6 s of use through a alone, twice the idle timeout
            assert a.proxy_get(client="slider", region="us-east")[1] == server
            threading.Event().wait(0.5)  # the client's pace, the subject of the test
        assert redis.command("GET", key) is not None
        assert b.proxy_get(client="slider", region="us-east")[1] == server


def test_redis_down_then_back_empty(three: list[Backend]) -> None:
    """Redis killed: every instance keeps serving with no error, admin changes are refused with one
    line; Redis started again empty: the instances write back what they hold and resync."""
    with redis_server() as store, instances(store, entries=entries_of(three[:2])) as (a, b):
        ok(a.lbctl("register", "--id", "late", "--url", three[2].url, "--region", "us-east", "--capacity", "50"))
        wait_until(lambda: "late" in b.servers(), timeout=SPREAD_S)
        ok(b.lbctl("drain", "c1"))
        clients = {f"r{n}": a.proxy_get(client=f"r{n}", region="us-east")[1] for n in range(20)}
        name = a.get("/v1/cluster")["name"]
        store.kill()
        for daemon in (a, b):
            wait_until(lambda d=daemon: d.get("/v1/cluster")["store"] == "unreachable")
            assert value(scrape(daemon), "lbd_cluster_store_up") == 0
        for client, server in clients.items():  # served from what each holds, no error from the outage
            assert a.proxy_get(client=client, region="us-east")[:2] == (200, server)
            assert b.proxy_get(client=client, region="us-east")[0] == 200
        assert b.proxy_get(client="new-during-outage", region="us-east")[0] == 200
        assert value(scrape(b), "lbd_cluster_claims_total", result="local") == 0  # not asked: known away
        assert value(scrape(b), "lbd_cluster_pending_pins") >= 1  # written back once the store answers
        assert_one_line_error(a.lbctl("undrain", "c1"), 1, "cluster store is unreachable")
        status, body = a.request("POST", "/v1/servers/c1/undrain")
        assert status == 503 and body["error"]["code"] == "store_unavailable"
        assert a.servers()["c1"]["draining"]  # refused, not made here only
        store.start()  # the same port, empty (no persistence)
        for daemon in (a, b):
            wait_until(lambda d=daemon: d.get("/v1/cluster")["store"] == "connected", timeout=15)
        wait_until(lambda: stored_servers(store, a) == {"late"}, timeout=5)  # the registration written back
        assert store.command("SISMEMBER", f"lb:{{{name}}}:draining", "c1") == "1"
        wait_until(lambda: store.command("GET", f"lb:{name}:s:r0") is not None, timeout=5)
        assert set(a.servers()) == set(b.servers()) == {"c1", "c2", "late"}
        ok(a.lbctl("undrain", "c1"))  # changes work again
        wait_until(lambda: not b.servers()["c1"]["draining"], timeout=SPREAD_S)
        for daemon in (a, b):  # the outage is one warning line, no traceback, no line per retry
            assert "Traceback" not in daemon.log()
            assert daemon.log().count("the store is unreachable") == 1


def test_pins_made_apart_during_an_outage_settle_on_the_stores(three: list[Backend]) -> None:
    """A client pinned on one instance while Redis was away, and on another server by another
    instance that reached Redis first: once back, every instance uses the store's pin."""
    with redis_server() as store, instances(store, entries=entries_of(three)) as (a, b):
        name = a.get("/v1/cluster")["name"]
        store.kill()
        wait_until(lambda: a.get("/v1/cluster")["store"] == "unreachable")
        local = a.proxy_get(client="apart", region="us-east")[1]
        elsewhere = next(backend.id for backend in three if backend.id != local)
        store.start(password="not-for-lbd")  # up, but lbd is refused until the store holds the other pin
        assert store.command("SET", f"lb:{name}:s:apart", f"{elsewhere}\tus-east", "EX", "600") == "OK"
        store.open_up()
        wait_until(lambda: a.get("/v1/cluster")["store"] == "connected", timeout=15)
        wait_until(lambda: a.get("/v1/route/apart?region=us-east")["server"] == elsewhere, timeout=5)
        assert a.proxy_get(client="apart", region="us-east")[1] == elsewhere
        assert b.proxy_get(client="apart", region="us-east")[1] == elsewhere
        assert store.command("GET", f"lb:{name}:s:apart") == f"{elsewhere}\tus-east"
        assert "Traceback" not in a.log()  # refused for a password is one more way of being away


def test_an_instance_starting_without_redis_serves_its_file_and_joins_later(three: list[Backend]) -> None:
    store = RedisServer()  # its port chosen, not started yet
    try:
        config = cluster_config(f"t{uuid.uuid4().hex[:10]}")
        args = ["--mode", "dynamic", "--config", config, "--cluster", store.url]
        with running_lbd(args, entries_of(three)) as daemon:
            assert daemon.get("/v1/cluster")["store"] == "unreachable"
            assert daemon.proxy_get(client="early", region="us-east")[0] == 200
            store.start()
            wait_until(lambda: daemon.get("/v1/cluster")["store"] == "connected", timeout=15)
            name = daemon.get("/v1/cluster")["name"]
            wait_until(lambda: store.command("GET", f"lb:{name}:s:early") is not None, timeout=5)
            assert "Traceback" not in daemon.log()
    finally:
        store.close()


def test_the_store_password_is_never_shown(three: list[Backend]) -> None:
    with redis_server(password="s3cret-pass") as store:
        config = Path(cluster_config("secretive"))
        url = f"redis://:s3cret-pass@127.0.0.1:{store.port}/0"
        config.write_text(config.read_text() + f'url = "{url}"\n')
        with running_lbd(["--mode", "dynamic", "--config", str(config)], entries_of(three)) as daemon:
            wait_until(lambda: daemon.get("/v1/cluster")["store"] == "connected")
            shown = json.dumps([daemon.get("/v1/status"), daemon.get("/v1/cluster"), daemon.get("/v1/config")])
            dump = ok(daemon.lbctl("config", "dump"))
            assert f"redis://127.0.0.1:{store.port}/0" in dump
            config.write_text(config.read_text().replace('name = "secretive"', 'name = "other"'))
            refused = daemon.lbctl("reload")  # [cluster] is bound at start: the refusal names it, not the password
            assert_one_line_error(refused, 1, "cluster changed from redis://127.0.0.1")
            assert "s3cret" not in shown + dump + refused.stdout + refused.stderr + daemon.log()


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://127.0.0.1:6379", "scheme 'http' is not one of redis, rediss, unix"),
        ("redis://127.0.0.1:6379/zero", "the database 'zero' is not a number"),
        ("unix://", "needs the socket's path"),
    ],
)
def test_a_bad_cluster_url_is_one_line_from_check_config(tmp_path: Path, url: str, message: str) -> None:
    config = tmp_path / "lbd.toml"
    config.write_text(f'[cluster]\nurl = "{url}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "lbd", "check-config", str(config)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
