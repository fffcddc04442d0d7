"""TLS on the listener, with certificates made here (trustme) and real clients: curl with --cacert
(verification on), Python's ssl, openssl s_client (ALPN, protocol versions); SNI over two
certificates; a reload while a TLS keep-alive connection is open; mutual TLS accepted and refused;
bad certificates and keys refused with one line; the handshake held to the header timeout; the
plain listener turned off; WebSocket, 100-continue and streaming over TLS."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import http.client
import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from lbd.config import CertificateFiles, TlsSettings, config_to_mapping, load_config
from lbd.errors import ConfigError
from lbd.tls import Certificates, TlsTerminator, load_certificates, subject_value
from tests.harness.backends import Backend, backends
from tests.harness.cli import assert_one_line_error
from tests.harness.daemon import Lbd, short_tempdir, wait_until, write_servers

FORGED = "CN=mallory"


@dataclass
class Pki:
    """A CA, certificates for a.test (the default) and b.test, a client CA and a client."""

    dir: Path
    ca: trustme.CA
    client_ca: trustme.CA

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    def issue(self, stem: str, *names: str, days: float | None = None) -> tuple[Path, Path]:
        """cert and key files `stem`.pem / `stem`.key for `names`, valid for `days` (else long)."""
        not_after = None
        if days is not None:
            not_after = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)
        leaf = self.ca.issue_cert(*names, not_after=not_after)
        cert, key = self.dir / f"{stem}.pem", self.dir / f"{stem}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key

    def verifying(self) -> ssl.SSLContext:
        """A client context that trusts only this CA (hostname checks on)."""
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    directory = short_tempdir()
    made = Pki(directory, trustme.CA(), trustme.CA())
    made.ca.cert_pem.write_to_path(str(made.ca_file))
    made.issue("a", "a.test", "127.0.0.1")
    made.issue("b", "b.test", "*.b.test")
    made.client_ca.cert_pem.write_to_path(str(directory / "client-ca.pem"))
    alice = made.client_ca.issue_cert("alice@example.com", common_name="alice", organization_name="Example")
    alice.private_key_and_cert_chain_pem.write_to_path(str(directory / "alice.pem"))
    yield made
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    with backends("s1") as started:
        yield started[0]


@pytest.fixture
def workdir(pki: Pki) -> Iterator[Path]:
    path = short_tempdir()
    for name in ("a.pem", "a.key", "b.pem", "b.key", "client-ca.pem"):
        shutil.copy(pki.dir / name, path / name)
    yield path
    shutil.rmtree(path, ignore_errors=True)


TWO_CERTIFICATES = """
[tls]
listen = "127.0.0.1:0"
cert = "a.pem"
key = "a.key"
[[tls.certificates]]
cert = "b.pem"
key = "b.key"
"""


def start(workdir: Path, backend: Backend, config: str, *args: str) -> Lbd:
    write_servers(workdir, [backend.entry()])
    (workdir / "lbd.toml").write_text(f'servers = "servers.json"\n{config}')
    return Lbd(workdir, ["--config", str(workdir / "lbd.toml"), *args]).start()


@pytest.fixture
def daemon(workdir: Path, backend: Backend) -> Iterator[Lbd]:
    started = start(workdir, backend, f'client_id_fallback = "cookie"\n{TWO_CERTIFICATES}')
    yield started
    started.stop()


def curl(pki: Pki, url: str, *args: str, resolve: str | None = None) -> subprocess.CompletedProcess[str]:
    """curl with verification against the test CA; `resolve` a name to 127.0.0.1 (SNI and hostname)."""
    command = ["curl", "-sS", "--max-time", "20", "--cacert", str(pki.ca_file), *args]
    if resolve is not None:
        port = url.rsplit(":", 1)[1].split("/", 1)[0]
        command += ["--resolve", f"{resolve}:{port}:127.0.0.1"]
    return subprocess.run([*command, url], capture_output=True, text=True, timeout=30, check=False)


def https(daemon: Lbd, host: str = "127.0.0.1") -> str:
    return f"https://{host}:{daemon.tls_port}"


def peer_certificate(pki: Pki, port: int, server_name: str | None) -> dict[str, Any]:
    """The certificate lbd presents for `server_name` (verified against the CA and that name)."""
    context = pki.verifying()
    if server_name is None:
        context.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        certificate = tls.getpeercert()
    assert certificate
    return certificate


def alt_names(certificate: dict[str, Any]) -> list[str]:
    return [value for _, value in certificate["subjectAltName"]]


def echo(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def test_curl_verifies_the_certificate_and_the_server_learns_https(daemon: Lbd, pki: Pki) -> None:
    secure = echo(curl(pki, f"{https(daemon)}/echo", "-H", "client-id: c1", "-H", "X-Forwarded-Proto: http"))
    assert secure["headers"]["x-forwarded-proto"] == "https"  # the client's own is replaced
    plain = json.loads(subprocess.run(["curl", "-sS", "-H", "client-id: c1", f"{daemon.url}/echo"],
                                      capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert plain["headers"]["x-forwarded-proto"] == "http"
    untrusted = subprocess.run(["curl", "-sS", f"{https(daemon)}/echo"], capture_output=True, text=True, check=False)
    assert untrusted.returncode == 60, untrusted.stderr  # verification on: the system CAs do not know ours


def test_the_cookie_fallback_issues_secure_cookies_over_tls_only(daemon: Lbd, pki: Pki) -> None:
    over_tls = curl(pki, f"{https(daemon)}/echo", "-D", "-", "-o", "/dev/null")
    cookie = next(line for line in over_tls.stdout.splitlines() if line.lower().startswith("set-cookie"))
    assert cookie.rstrip().endswith("; Secure")
    plain = subprocess.run(["curl", "-sS", "-D", "-", "-o", "/dev/null", f"{daemon.url}/echo"],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    cookie = next(line for line in plain.splitlines() if line.lower().startswith("set-cookie"))
    assert "Secure" not in cookie


def test_sni_chooses_the_certificate_by_its_names(daemon: Lbd, pki: Pki) -> None:
    for host in ("a.test", "b.test", "www.b.test"):
        answer = echo(curl(pki, f"{https(daemon, host)}/echo", "-H", "client-id: c1", resolve=host))
        assert answer["headers"]["host"] == f"{host}:{daemon.tls_port}"
    assert "b.test" in alt_names(peer_certificate(pki, daemon.tls_port, "b.test"))
    assert "a.test" in alt_names(peer_certificate(pki, daemon.tls_port, "a.test"))
    # no SNI (an IP address) and an unknown name get the default, the first certificate
    assert "a.test" in alt_names(peer_certificate(pki, daemon.tls_port, None))
    mismatch = curl(pki, f"{https(daemon, 'c.test')}/echo", resolve="c.test")
    assert mismatch.returncode == 60 and "c.test" in mismatch.stderr


def s_client(port: int, *args: str) -> str:
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "a.test", *args],
        input="", capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return done.stdout + done.stderr


def test_alpn_answers_http_1_1_and_only_tls_1_2_and_1_3_are_spoken(daemon: Lbd, pki: Pki) -> None:
    assert "ALPN protocol: http/1.1" in s_client(daemon.tls_port, "-alpn", "h2,http/1.1")
    assert "No ALPN negotiated" in s_client(daemon.tls_port, "-alpn", "h2")
    for flag, version in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
        assert f"New, {version}, Cipher is" in s_client(daemon.tls_port, flag)
    for flag in ("-tls1", "-tls1_1"):  # the client offers it (security level 0); lbd refuses
        assert "Cipher is (NONE)" in s_client(daemon.tls_port, flag, "-cipher", "DEFAULT@SECLEVEL=0")
    # an h2-only client still gets HTTP/1.1 (curl falls back when ALPN picks nothing)
    result = curl(pki, f"{https(daemon)}/echo", "--http2", "-H", "client-id: c1", "-w", "%{http_version}")
    assert result.stdout.endswith("1.1"), result.stdout


def test_a_reload_serves_the_new_certificate_to_new_handshakes_only(daemon: Lbd, pki: Pki, workdir: Path) -> None:
    before = peer_certificate(pki, daemon.tls_port, "a.test")
    kept = http.client.HTTPSConnection("127.0.0.1", daemon.tls_port, timeout=10, context=pki.verifying())
    kept.request("GET", "/echo", headers={"client-id": "c1", "Host": "a.test"})
    assert kept.getresponse().read()
    first_seen = kept.sock.getpeercert()  # type: ignore[union-attr]
    cert, key = pki.issue("a2", "a.test", "127.0.0.1", days=30)
    shutil.copy(cert, workdir / "a.pem")
    shutil.copy(key, workdir / "a.key")
    result = daemon.lbctl("reload", "--json")
    assert result.returncode == 0, result.stderr
    changed = {change["key"]: change for change in json.loads(result.stdout)["changed"]}
    assert f"tls.certificate {workdir / 'a.pem'}" in changed
    # the open keep-alive connection is untouched: same TLS session, same certificate
    kept.request("GET", "/echo", headers={"client-id": "c1", "Host": "a.test"})
    assert json.loads(kept.getresponse().read())["headers"]["x-forwarded-proto"] == "https"
    assert kept.sock.getpeercert() == first_seen  # type: ignore[union-attr]
    kept.close()
    after = peer_certificate(pki, daemon.tls_port, "a.test")
    assert after["serialNumber"] != before["serialNumber"]
    status = daemon.get("/v1/status")["tls"]
    assert status["certificates"][0]["names"] == ["a.test", "127.0.0.1"]
    assert 29 < status["certificates"][0]["days_left"] <= 30


def test_a_bad_reload_keeps_the_old_certificate(daemon: Lbd, pki: Pki, workdir: Path) -> None:
    before = peer_certificate(pki, daemon.tls_port, "a.test")
    shutil.copy(workdir / "b.key", workdir / "a.key")  # a key that is not a.pem's
    line = assert_one_line_error(daemon.lbctl("reload"), 1, str(workdir / "a.key"), "does not match")
    assert str(workdir / "a.pem") in line
    assert peer_certificate(pki, daemon.tls_port, "a.test")["serialNumber"] == before["serialNumber"]
    assert daemon.get("/v1/status")["reload"]["last"]["ok"] is False


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbd", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def assert_config_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("damage", "file", "problem"),
    [
        ("mismatch", "a.key", "the key does not match the certificate"),
        ("missing", "a.pem", "cannot read the certificate: No such file or directory"),
        ("unreadable", "a.key", "cannot read the key: Permission denied"),
        ("not-pem", "a.pem", "not a PEM certificate"),
        ("not-pem", "a.key", "not a PEM private key"),
        ("expired", "a.pem", "the certificate expired on"),
    ],
)
def test_a_bad_certificate_or_key_is_one_line_naming_the_file(
    pki: Pki, workdir: Path, damage: str, file: str, problem: str
) -> None:
    target = workdir / file
    if damage == "mismatch":
        shutil.copy(workdir / "b.key", target)
    elif damage == "missing":
        target.unlink()
    elif damage == "unreadable":
        target.chmod(0)
        if target.stat().st_uid == 0 and _root_reads(target):
            pytest.skip("root reads files whatever their mode")
    elif damage == "not-pem":
        target.write_text("this is not PEM\n")
    else:
        cert, key = pki.issue("old", "a.test", days=-1)
        shutil.copy(cert, workdir / "a.pem")
        shutil.copy(key, workdir / "a.key")
    (workdir / "lbd.toml").write_text(TWO_CERTIFICATES)
    assert_config_error(check_config(workdir / "lbd.toml"), str(target), problem)
    # start refuses it the same way, before binding anything
    start_result = subprocess.run(
        [sys.executable, "-m", "lbd", "start", "--config", str(workdir / "lbd.toml"),
         "--admin-socket", str(workdir / "lbd.sock"), "--state-dir", str(workdir / "state")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert_config_error(start_result, str(target), problem)


def _root_reads(path: Path) -> bool:
    try:
        path.read_bytes()
    except PermissionError:
        return False
    return True


def test_check_config_describes_the_tls_listener_and_refuses_no_listener(pki: Pki, workdir: Path) -> None:
    (workdir / "lbd.toml").write_text(f"listen = false\n{TWO_CERTIFICATES}")
    result = check_config(workdir / "lbd.toml")
    assert result.returncode == 0, result.stderr
    assert (
        "listen off, tls listen 127.0.0.1:0 with 2 certificates (a.test, 127.0.0.1; b.test, *.b.test)" in result.stdout
    )
    (workdir / "lbd.toml").write_text("listen = false\n")
    assert_config_error(check_config(workdir / "lbd.toml"), "no listener")


MUTUAL = TWO_CERTIFICATES.replace(
    "[tls]\n", '[tls]\nclient_ca = "client-ca.pem"\nclient_subject_header = "X-Client-Subject"\n'
)


def test_mutual_tls_accepts_verified_clients_and_passes_their_subject(
    workdir: Path, backend: Backend, pki: Pki
) -> None:
    daemon = start(workdir, backend, MUTUAL)
    try:
        alice = str(pki.dir / "alice.pem")
        answer = echo(curl(pki, f"{https(daemon)}/echo", "--cert", alice, "-H", "client-id: c1",
                           "-H", f"X-Client-Subject: {FORGED}"))  # fmt: skip
        subject = answer["headers"]["x-client-subject"]
        assert subject.startswith("CN=alice,") and subject.endswith(",O=Example")  # RFC 4514, most specific first
        refused = curl(pki, f"{https(daemon)}/echo", "-H", "client-id: c1")
        assert refused.returncode != 0  # no client certificate: the handshake fails
        stranger = short_tempdir()
        try:
            other = trustme.CA().issue_cert("eve@example.com", common_name="eve")
            other.private_key_and_cert_chain_pem.write_to_path(str(stranger / "eve.pem"))
            assert curl(pki, f"{https(daemon)}/echo", "--cert", str(stranger / "eve.pem")).returncode != 0
        finally:
            shutil.rmtree(stranger, ignore_errors=True)
        # the plain listener drops a client's copy too: only lbd writes that header
        plain = subprocess.run(
            ["curl", "-sS", "-H", "client-id: c1", "-H", f"X-Client-Subject: {FORGED}", f"{daemon.url}/echo"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert "x-client-subject" not in json.loads(plain.stdout)["headers"]
        assert daemon.get("/v1/status")["tls"]["client_ca"] == str(workdir / "client-ca.pem")
    finally:
        daemon.stop()


def test_a_stalled_handshake_is_cut_at_the_header_timeout(workdir: Path, backend: Backend) -> None:
    daemon = start(workdir, backend, f"[limits]\nheader_timeout_ms = 500\n{TWO_CERTIFICATES}")
    try:
        with socket.create_connection(("127.0.0.1", daemon.tls_port), timeout=10) as stalled:
            stalled.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
            started = time.monotonic()
            assert stalled.recv(100) == b""  # closed by lbd (within the 10 s socket timeout)
            assert time.monotonic() - started < 5
    finally:
        daemon.stop()


def test_tls_only_with_the_plain_listener_off(workdir: Path, backend: Backend, pki: Pki) -> None:
    daemon = start(workdir, backend, TWO_CERTIFICATES, "--listen", "off")
    try:
        listeners = daemon.get("/v1/status")["listeners"]
        assert "proxy" not in listeners and "tls" in listeners
        echo(curl(pki, f"{https(daemon)}/echo", "-H", "client-id: c1"))
        dumped = daemon.lbctl("config", "dump")
        assert dumped.returncode == 0, dumped.stderr
        assert "listen = false" in dumped.stdout and "[tls]" in dumped.stdout
    finally:
        daemon.stop()


def test_status_metrics_and_expiry_warnings(workdir: Path, backend: Backend, pki: Pki) -> None:
    cert, key = pki.issue("soon", "soon.test", days=5)
    shutil.copy(cert, workdir / "b.pem")
    shutil.copy(key, workdir / "b.key")
    daemon = start(workdir, backend, TWO_CERTIFICATES)
    try:
        certificates = daemon.get("/v1/status")["tls"]["certificates"]
        assert [c["names"] for c in certificates] == [["a.test", "127.0.0.1"], ["soon.test"]]
        assert 4 < certificates[1]["days_left"] <= 5
        metrics = daemon.request("GET", "/metrics")[1]
        assert f'lbd_tls_certificate_expiry_seconds{{file="{workdir / "b.pem"}",name="soon.test"}}' in metrics
        warnings = wait_until(lambda: [line for line in daemon.log().splitlines() if "expires in" in line])
        assert len(warnings) == 1 and str(workdir / "b.pem") in warnings[0] and "soon.test" in warnings[0]
        shown = daemon.lbctl("status")
        assert shown.returncode == 0, shown.stderr
        assert "soon.test" in shown.stdout and "days left" in shown.stdout
    finally:
        daemon.stop()


def test_websocket_100_continue_and_streaming_over_tls(daemon: Lbd, pki: Pki) -> None:
    size = 8 << 20
    body = pki.dir / "upload.bin"
    body.write_bytes(bytes(range(256)) * (size // 256))
    try:
        upload = echo(curl(pki, f"{https(daemon)}/upload", "-H", "client-id: c1", "-H", "Expect: 100-continue",
                           "--data-binary", f"@{body}"))  # fmt: skip
        assert upload["length"] == size
        assert upload["sha256"] == hashlib.sha256(body.read_bytes()).hexdigest()
    finally:
        body.unlink()
    download = subprocess.run(
        ["curl", "-sS", "--cacert", str(pki.ca_file), "-H", "client-id: c1", f"{https(daemon)}/bytes/{size}"],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    assert download.stdout == b"x" * size

    async def websocket() -> list[str]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(
                f"wss://127.0.0.1:{daemon.tls_port}/ws", headers={"client-id": "c1"}, ssl=pki.verifying()
            ) as ws,  # fmt: skip
        ):
            replies = []
            for text in ("one", "two"):
                await ws.send_str(text)
                replies.append((await ws.receive(timeout=10)).data)
            return replies

    assert asyncio.run(websocket()) == ["s1:one", "s1:two"]


# --- pure parts ----------------------------------------------------------------------------------


def test_tls_keys_parse_resolve_and_dump(tmp_path: Path) -> None:
    path = tmp_path / "lbd.toml"
    tls = TWO_CERTIFICATES.replace("[tls]\n", '[tls]\nclient_ca = "ca.pem"\nsession_tickets = false\n')
    path.write_text(f"listen = false\n{tls}")
    config = load_config(path, {"tls.key": str(tmp_path / "other.key")})
    assert config.listen is None
    assert config.tls.pairs == (
        CertificateFiles(tmp_path / "a.pem", tmp_path / "other.key"),
        CertificateFiles(tmp_path / "b.pem", tmp_path / "b.key"),
    )
    assert config.tls.client_ca == tmp_path / "ca.pem" and config.tls.session_tickets is False
    dumped = config_to_mapping(config)
    assert dumped["listen"] is False and dumped["tls"]["certificates"][0]["cert"] == str(tmp_path / "b.pem")
    assert "tls" not in config_to_mapping(load_config(None, {}))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[tls]\nlisten = "127.0.0.1:8443"\n', "tls: listen is set but no certificate is"),
        ('[tls]\ncert = "a.pem"\nkey = "a.key"\n', "tls: certificates are set but listen is not"),
        ('[tls]\nlisten = "127.0.0.1:8443"\ncert = "a.pem"\n', "tls: cert is set but key is not"),
        ('[tls]\nlisten = "127.0.0.1:8443"\n[[tls.certificates]]\ncert = "a.pem"\n', "tls.certificates[0]: key is"),
        ('[tls]\nlisten = "x"\n', "tls.listen: 'x' is not HOST:PORT"),
        ("[tls]\nbogus = 1\n", "tls: unknown key 'bogus'"),
        ('[tls]\nclient_subject_header = "X Bad"\n', "tls.client_subject_header: must be a header name"),
        ('[tls]\nclient_subject_header = "X-A\\n"\n', "tls.client_subject_header: must be a header name"),
        ('[tls]\nclient_subject_header = "Content-Length"\n', "'Content-Length' is a field lbd reads or writes"),
        ('[tls]\nclient_subject_header = "client-id"\n', "'client-id' is a field lbd reads or writes"),
        ("listen = false\n", "lbd would have no listener"),
    ],
)
def test_bad_tls_keys_are_named(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "lbd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
        load_config(path, {})


def test_sni_names_exact_then_wildcard_then_the_default(pki: Pki) -> None:
    settings = TlsSettings(
        listen=load_config(None, {}).listen,
        cert=pki.dir / "a.pem", key=pki.dir / "a.key",
        certificates=(CertificateFiles(pki.dir / "b.pem", pki.dir / "b.key"),),
    )  # fmt: skip
    certificates = load_certificates(settings)
    assert isinstance(certificates, Certificates)
    a, b = (c.context for c in certificates.certificates)
    assert certificates.context_for("A.test.") is a
    assert certificates.context_for("b.test") is b and certificates.context_for("x.b.test") is b
    assert certificates.context_for("x.y.b.test") is a  # a wildcard covers one label only
    assert certificates.context_for(None) is a and certificates.context_for("other") is a
    terminator = TlsTerminator(certificates)
    assert terminator.warn_expiring() == 0
    assert terminator.context.verify_mode == ssl.CERT_NONE


def test_a_subject_reaches_a_header_without_control_characters() -> None:
    leaf = trustme.CA().issue_cert("x@example.com", common_name="a\r\nInjected: 1", organization_name="Exämple")
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    value = subject_value(der)
    assert b"\r" not in value and b"\n" not in value
    assert value.startswith(b"CN=a\\0D\\0AInjected: 1,") and value.endswith(b",O=Ex\\C3\\A4mple")


def test_every_worker_terminates_tls_and_takes_a_reloaded_certificate(
    workdir: Path, backend: Backend, pki: Pki
) -> None:
    """`--workers 2`: each worker serves the TLS listener on its own socket, and a reload reaches them all."""
    daemon = start(workdir, backend, TWO_CERTIFICATES, "--workers", "2")
    try:
        for n in range(8):  # a connection each: the kernel spreads them over both workers
            assert echo(curl(pki, f"{https(daemon)}/echo", "-H", f"client-id: t{n}"))["headers"]["x-forwarded-proto"]
        assert all(worker["requests"] > 0 for worker in daemon.get("/v1/status")["workers"])
        before = peer_certificate(pki, daemon.tls_port, "a.test")["serialNumber"]
        cert, key = pki.issue("a3", "a.test", "127.0.0.1", days=20)
        shutil.copy(cert, workdir / "a.pem")
        shutil.copy(key, workdir / "a.key")
        assert daemon.lbctl("reload").returncode == 0
        serials = {peer_certificate(pki, daemon.tls_port, "a.test")["serialNumber"] for _ in range(8)}
        assert before not in serials and len(serials) == 1  # every worker presents the new one
    finally:
        daemon.stop()
