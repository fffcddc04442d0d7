"""Clients that cannot send client-id (`client_id_fallback`): the default refuses them, `client-ip`
routes them by address, `cookie` gives each a cookie and routes by it. The cookie cases use curl's
cookie jar, a real client that keeps and returns cookies the way a browser does."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.backends import Backend, backends
from tests.harness.clients import curl
from tests.harness.daemon import Lbd, running_lbd


@pytest.fixture(scope="module")
def three() -> Iterator[list[Backend]]:
    with backends("b1", "b2", "b3") as started:
        yield started


def get(daemon: Lbd, *args: str) -> tuple[str, dict[str, list[str]]]:
    """curl GET /echo: (the answering backend, the response headers by lower-cased name)."""
    result = curl("-sS", "-D", "-", "-o", "/dev/null", *args, f"{daemon.url}/echo")
    assert result.returncode == 0, result.stderr
    headers: dict[str, list[str]] = {}
    for line in result.stdout.decode().splitlines()[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    status = result.stdout.split(b" ", 2)[1]
    assert status == b"200", result.stdout
    return headers["x-backend-id"][0], headers


def test_without_a_fallback_a_request_without_client_id_is_refused(three: list[Backend]) -> None:
    with running_lbd(entries=[b.entry() for b in three]) as daemon:
        result = curl("-sS", "-w", "%{http_code}", f"{daemon.url}/echo")
        assert result.stdout.endswith(b"400") and b"missing the client-id header" in result.stdout


def test_client_ip_routes_by_the_client_address(three: list[Backend]) -> None:
    with running_lbd(["--client-id-fallback", "client-ip"], [b.entry() for b in three]) as daemon:
        answered = {get(daemon)[0] for _ in range(6)}
        assert len(answered) == 1  # one address, one server
        route = daemon.get("/v1/route/127.0.0.1")
        assert route["server"] in answered


def test_cookie_issues_an_id_once_and_the_client_sticks_to_it(three: list[Backend], tmp_path: Path) -> None:
    with running_lbd(["--client-id-fallback", "cookie"], [b.entry() for b in three]) as daemon:
        servers_of_clients = []
        for client in range(12):
            jar = str(tmp_path / f"jar-{client}")
            first, headers = get(daemon, "-c", jar)
            (cookie,) = headers["set-cookie"]
            name_value, *attributes = [part.strip() for part in cookie.split(";")]
            assert name_value.startswith("lbd_client=") and len(name_value) > len("lbd_client=") + 16
            assert set(attributes) == {"Path=/", "HttpOnly", "SameSite=Lax"}
            for _ in range(3):  # the jar sends the cookie back: same server, nothing issued again
                again, headers = get(daemon, "-b", jar, "-c", jar)
                assert again == first and "set-cookie" not in headers
            servers_of_clients.append(first)
        assert len(set(servers_of_clients)) > 1  # different browsers spread over the servers


def test_a_cookie_id_is_a_session_in_dynamic_mode(three: list[Backend], tmp_path: Path) -> None:
    args = ["--mode", "dynamic", "--client-id-fallback", "cookie"]
    config = tmp_path / "lbd.toml"
    config.write_text('default_client_region = "us-east"\nclient_id_cookie = "who"\n')
    with running_lbd([*args, "--config", str(config)], [b.entry() for b in three]) as daemon:
        jar = str(tmp_path / "jar")
        server, headers = get(daemon, "-c", jar)
        client_id = headers["set-cookie"][0].split(";")[0].removeprefix("who=")
        (session,) = daemon.get("/v1/sessions")["sessions"]
        assert (session["client_id"], session["server"]) == (client_id, server)
        assert get(daemon, "-b", jar)[0] == server


def test_an_unusable_cookie_value_gets_a_new_id(three: list[Backend]) -> None:
    with running_lbd(["--client-id-fallback", "cookie"], [b.entry() for b in three]) as daemon:
        for bad in ("x" * 200, 'a"b', ""):
            _, headers = get(daemon, "-H", f"Cookie: other=1; lbd_client={bad}")
            assert headers["set-cookie"][0].startswith("lbd_client=")


def test_a_client_id_header_wins_over_the_fallback(three: list[Backend]) -> None:
    with running_lbd(["--client-id-fallback", "cookie"], [b.entry() for b in three]) as daemon:
        server, headers = get(daemon, "-H", "client-id: alice")
        assert "set-cookie" not in headers
        assert server == daemon.get("/v1/route/alice")["server"]


@pytest.mark.parametrize(
    "line, message",
    [
        ('client_id_fallback = "header"', "client_id_fallback: must be one of reject, client-ip, cookie; got 'header'"),
        ('client_id_cookie = "a b"', "client_id_cookie: must be a cookie name"),
        ('client_id_cookie = "lbd_client\\n"', "client_id_cookie: must be a cookie name"),  # a line break in Set-Cookie
    ],
)
def test_a_bad_fallback_setting_is_one_line(tmp_path: Path, line: str, message: str) -> None:
    config = tmp_path / "lbd.toml"
    config.write_text(line + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "lbd", "check-config", str(config)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
