"""The processes `bench/compare.py` measures: nginx backends, HAProxy and lbd, with generated configs.

Every child runs in its own process group, pinned with `taskset`, logging to a file in the run's
temporary directory; `Stack.close()` ends them all (SIGTERM, then SIGKILL) whatever happened.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lbctl.client import UnixHTTPConnection

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
SERVER_REGIONS = ("us-east", "eu-west", "asia-south")  # one nginx backend in each
CAPACITY = 1000  # far above 64 connections, so lbd's 90%-full backup rule never applies
BIG_FILE = "big.bin"
TINY_BODY = "ok\n"


class StartError(RuntimeError):
    """A child did not come up; the message carries the tail of its log."""


def tool(name: str) -> str:
    """A system binary's path; nginx and haproxy live in /usr/sbin, often not on a user's PATH."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise StartError(f"{name} not found: run `make bench-deps` (or apt-get install {name})")
    return found


def free_port() -> int:
    """A loopback port that was free a moment ago (the kernel's choice for port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def pin(cpu: int | None) -> list[str]:
    """The `taskset` prefix for a CPU, or nothing when pinning is off."""
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


@dataclass
class Child:
    """One started process; `log` is where its stdout and stderr went."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            last = self.tail(1).strip() or "no output"
            raise StartError(f"{self.name} exited with {self.process.returncode}: {last}\n{self.tail()}")

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the whole group, SIGKILL it after `grace_s`."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(grace_s)
        with contextlib.suppress(ProcessLookupError):  # stray grandchildren, e.g. nginx's worker
            os.killpg(self.process.pid, signal.SIGKILL)


def http_get(port: int, path: str, headers: dict[str, str], timeout: float = 2.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def admin(socket_path: Path, method: str, path: str, body: object = None) -> tuple[int, object]:
    """One admin API call; returns the status and the decoded JSON answer."""
    connection = UnixHTTPConnection(socket_path, timeout=5.0)
    try:
        payload = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    haproxy_pem: Path  # HAProxy's `crt`: the certificate and its key in one file


@dataclass
class Stack:
    """The run's temporary directory and every child started in it."""

    workdir: Path
    proxy_cpu: int | None
    load_cpu: int | None
    lbd_command: list[str] = field(default_factory=lambda: [str(VENV_BIN / "lbd")])
    base_lbd_command: list[str] = field(default_factory=list)  # --base-lbd-cmd: a second lbd measured beside
    lbd_config: Path | None = None  # a config file every lbd gets (--config), e.g. other health settings
    children: list[Child] = field(default_factory=list)
    backend_ports: list[int] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], cpu: int | None) -> Child:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [*pin(cpu), *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: Ctrl-C reaches us, and we end the group
                cwd=self.workdir,
            )
        child = Child(name, process, log)
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()

    def wait_http(self, child: Child, port: int, path: str, headers: dict[str, str], timeout_s: float = 20.0) -> None:
        """Poll until GET `path` answers 200, the child dies, or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            child.check_alive()
            try:
                status, body = http_get(port, path, headers)
                if status == 200:
                    return
                last = f"HTTP {status}: {body[:200]!r}"
            except OSError as error:
                last = str(error)
            time.sleep(0.1)
        raise StartError(
            f"{child.name} not answering {path} on port {port} after {timeout_s:.0f} s ({last}):\n{child.tail()}"
        )

    # -- nginx -----------------------------------------------------------------------------------

    def start_nginx(self, big_bytes: int, count: int = 3) -> Child:
        """One nginx master, one worker, `count` server blocks: /tiny, /64k, /big, /health, /sink."""
        self.workdir.chmod(0o755)  # nginx started as root serves files as `nobody`
        docroot = self.workdir / "www"
        docroot.mkdir(mode=0o755, exist_ok=True)
        (docroot / "64k").write_bytes(os.urandom(65536))
        with (docroot / BIG_FILE).open("wb") as big:
            big.truncate(big_bytes)  # sparse: zeros that cost no disk
        self.backend_ports = [free_port() for _ in range(count)]
        conf = self.workdir / "nginx.conf"
        conf.write_text(nginx_conf(self.workdir, docroot, self.backend_ports))
        child = self.spawn("nginx", [tool("nginx"), "-p", str(self.workdir), "-c", str(conf)], self.load_cpu)
        for port in self.backend_ports:
            self.wait_http(child, port, "/health", {})
        return child

    # -- HAProxy ---------------------------------------------------------------------------------

    def start_haproxy(self, tls: bool = False, threads: int = 1, name: str = "") -> tuple[Child, int, Path]:
        """HAProxy in the foreground (-db) with `threads` threads; returns it, its port (with `tls`,
        its TLS port) and its stats socket."""
        port, name = free_port(), name or ("haproxy-tls" if tls else "haproxy")
        tls_port = free_port() if tls else None
        conf = self.workdir / f"{name}.cfg"
        stats_socket = self.workdir / f"{name}.sock"
        bind = None if tls_port is None else (tls_port, self.tls_files().haproxy_pem)
        conf.write_text(haproxy_conf(port, self.backend_ports, stats_socket, bind, threads))
        child = self.spawn(name, [tool("haproxy"), "-db", "-f", str(conf)], self.proxy_cpu)
        self.wait_http(child, port, "/tiny", {"client-id": "warmup"})
        return child, port if tls_port is None else tls_port, stats_socket

    def tls_files(self) -> TlsFiles:
        """The one ECDSA P-256 certificate both proxies' TLS listeners present (made once, openssl)."""
        files = TlsFiles(self.workdir / "tls-cert.pem", self.workdir / "tls-key.pem", self.workdir / "tls-haproxy.pem")
        if not files.haproxy_pem.exists():
            subprocess.run(
                [tool("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", str(files.key), "-out", str(files.cert), "-days", "30", "-subj", "/CN=localhost",
                 "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                check=True, capture_output=True,
            )  # fmt: skip
            files.haproxy_pem.write_bytes(files.cert.read_bytes() + files.key.read_bytes())
        return files

    # -- lbd -------------------------------------------------------------------------------------

    def servers_json(self, count: int | None = None) -> list[dict[str, object]]:
        """One server per backend, or `count` servers spread over the backends (and their regions)."""
        count = len(self.backend_ports) if count is None else count
        places = list(zip(self.backend_ports, SERVER_REGIONS, strict=False))
        return [
            {"id": f"s{i + 1}", "url": f"http://127.0.0.1:{port}", "region": region, "capacity": CAPACITY}
            for i, (port, region) in ((i, places[i % len(places)]) for i in range(count))
        ]

    def start_redis(self) -> tuple[Child, str]:
        """A redis-server for the cluster row (persistence off), on the load CPU; its URL."""
        port = free_port()
        argv = [tool("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        child = self.spawn("redis", [*argv, "--dir", str(self.workdir)], self.load_cpu)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            child.check_alive()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                probe.sendall(b"PING\r\n")
                if probe.recv(64).startswith(b"+PONG"):
                    return child, f"redis://127.0.0.1:{port}/0"
            time.sleep(0.05)
        raise StartError(f"redis-server not answering on {port}:\n{child.tail()}")

    def start_sink(self) -> tuple[Child, int]:
        """bench/sink.py: a backend that reads whole bodies (for the upload check)."""
        port = free_port()
        child = self.spawn(
            "sink", [str(VENV_BIN / "python"), str(ROOT / "bench" / "sink.py"), str(port)], self.load_cpu
        )
        self.wait_http(child, port, "/health", {})
        return child, port

    def start_lbd_tls(self) -> tuple[Child, int, Path]:
        """lbd static with a TLS listener on the bench certificate, without session tickets (as
        HAProxy here: every new connection is a full handshake); returns its TLS port."""
        files, tls_port = self.tls_files(), free_port()
        config = (
            f'[tls]\nlisten = "127.0.0.1:{tls_port}"\ncert = "{files.cert}"\nkey = "{files.key}"\n'
            "session_tickets = false\n"
        )
        child, _, socket_path = self.start_lbd("static", name="lbd-tls", config=config)
        return child, tls_port, socket_path

    def start_lbd(
        self,
        mode: str,
        extra: list[dict[str, object]] | None = None,
        servers: int | None = None,
        name: str = "",
        config: str | None = None,
        command: list[str] | None = None,
        cluster: str | None = None,
        workers: int = 1,
        args: list[str] | None = None,
    ) -> tuple[Child, int, Path]:
        """lbd in `mode`, run by `command` (else the one under test), with `servers` servers over the
        backends (else one per backend); its log named after `name`, else lbd-MODE (base-MODE for
        `command`); `config` as its config file's text, else --lbd-config's file; `cluster` a store
        URL (--cluster); `workers` its proxy processes (--workers); `args` more flags; static gets
        the servers from --servers, dynamic has them registered over the API."""
        port = free_port()
        rundir = Path(tempfile.mkdtemp(prefix=f"lbd-{mode}-", dir=self.workdir))
        socket_path = rundir / "lbd.sock"
        servers_file = rundir / "servers.json"
        servers_file.write_text(json.dumps(self.servers_json(servers) + (extra or [])))
        argv = [*(command or self.lbd_command), "start", "--listen", f"127.0.0.1:{port}", "--mode", mode]
        argv += ["--admin-socket", str(socket_path), "--state-dir", str(rundir / "state"), "--log-level", "warning"]
        if mode == "static":
            argv += ["--servers", str(servers_file)]
        if config is not None:
            (rundir / "lbd.toml").write_text(config)
            argv += ["--config", str(rundir / "lbd.toml")]
        elif self.lbd_config is not None:
            argv += ["--config", str(self.lbd_config)]
        if cluster is not None:
            argv += ["--cluster", cluster]
        if workers != 1:
            argv += ["--workers", str(workers)]
        argv += args or []
        child = self.spawn(name or f"{'base' if command else 'lbd'}-{mode}", argv, self.proxy_cpu)
        if mode == "dynamic":
            self._register(child, socket_path, json.loads(servers_file.read_text()))
        self.wait_http(child, port, "/tiny", {"client-id": "warmup", "client-region": "us-east"})
        return child, port, socket_path

    def _register(self, child: Child, socket_path: Path, servers: list[dict[str, object]]) -> None:
        """Wait for the admin socket, then register the backends in one all-or-nothing call."""
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            child.check_alive()
            if time.monotonic() > deadline:
                raise StartError(f"{child.name}: no admin socket after 20 s:\n{child.tail()}")
            time.sleep(0.1)
        status, answer = admin(socket_path, "POST", "/v1/servers", servers)
        while status == 503 and time.monotonic() < deadline:  # a cluster store not joined yet
            time.sleep(0.1)
            status, answer = admin(socket_path, "POST", "/v1/servers", servers)
        if status not in (200, 201):
            raise StartError(f"{child.name}: registering the backends answered {status}: {answer}")


def client_routed_to(socket_path: Path, server_id: str, tries: int = 500) -> str:
    """A client id that lbd's static hash sends to `server_id` (asked through GET /v1/route)."""
    for i in range(tries):
        client_id = f"route-{i}"
        status, answer = admin(socket_path, "GET", f"/v1/route/{client_id}")
        if status == 200 and isinstance(answer, dict) and answer.get("server") == server_id:
            return client_id
    raise StartError(f"none of {tries} client ids routes to {server_id}")


def lbd_stats(socket_path: Path) -> dict[str, object]:
    """What lbd counted: requests and responses by class, sessions, and requests per server."""
    _, status = admin(socket_path, "GET", "/v1/status")
    _, answer = admin(socket_path, "GET", "/v1/servers")
    servers = answer.get("servers") if isinstance(answer, dict) else None
    if not isinstance(status, dict) or not isinstance(servers, list):
        return {}
    return {
        "requests": status["requests"],
        "sessions": status["sessions"]["total"],
        "per_server": {server["id"]: server["requests"] for server in servers},
        "health": {server["id"]: server["health"] for server in servers},
    }


def lbd_access_log(socket_path: Path) -> dict[str, int]:
    """What lbd's access log counted (from /metrics): lines written, lines dropped."""
    connection = UnixHTTPConnection(socket_path, timeout=5.0)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    counts = {"lines": 0, "dropped": 0}
    for line in text.splitlines():
        if line.startswith("lbd_access_log_lines_total "):
            counts["lines"] += int(float(line.split()[-1]))
        elif line.startswith("lbd_access_log_dropped_total{"):
            counts["dropped"] += int(float(line.split()[-1]))
    return counts


def haproxy_stats(stats_socket: Path) -> dict[str, object]:
    """HAProxy's counters in lbd_stats' shape: requests per server (`show stat` on its stats socket)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(stats_socket))
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    columns = lines[0].lstrip("# ").split(",")
    records = [dict(zip(columns, line.split(","), strict=False)) for line in lines[1:] if line]
    backend = next((r for r in records if r["pxname"] == "nginx" and r["svname"] == "BACKEND"), {})
    classes = {f"{n}xx": int(backend.get(f"hrsp_{n}xx") or 0) for n in range(1, 6)}
    return {
        "requests": {"total": int(backend.get("stot") or 0), "responses": classes},
        "per_server": {
            r["svname"]: int(r["stot"]) for r in records if r["pxname"] == "nginx" and r["svname"][0] == "s"
        },
    }


def nginx_conf(workdir: Path, docroot: Path, ports: list[int]) -> str:
    servers = "\n".join(
        f"""
    server {{
        listen 127.0.0.1:{port};
        root {docroot};
        location = /tiny {{ return 200 "{TINY_BODY.strip()}\\n"; }}
        location = /health {{ return 200 "{TINY_BODY.strip()}\\n"; }}
        location = /64k {{ try_files /64k =404; }}
        location = /big {{ try_files /{BIG_FILE} =404; }}
        location = /sink {{ client_max_body_size 0; return 200 "{TINY_BODY.strip()}\\n"; }}
    }}"""
        for port in ports
    )
    return f"""# generated by bench/stack.py
daemon off;
master_process on;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
worker_rlimit_nofile 8192;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_temp_path {workdir}/nginx-body;
    proxy_temp_path {workdir}/nginx-proxy;
    fastcgi_temp_path {workdir}/nginx-fastcgi;
    uwsgi_temp_path {workdir}/nginx-uwsgi;
    scgi_temp_path {workdir}/nginx-scgi;
{servers}
}}
"""


# Mozilla intermediate for TLS 1.2, as lbd's TLS listener (lbd/tls.py); TLS 1.3 suites are OpenSSL's defaults in both
TLS_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


def haproxy_conf(
    port: int, backend_ports: list[int], stats_socket: Path, tls: tuple[int, Path] | None = None, threads: int = 1
) -> str:
    """`threads` threads (one unless told), consistent hashing on client-id, keep-alive both ways,
    health checks like lbd's; with `tls` (port, certificate + key file) a TLS bind too, TLS 1.2+,
    ALPN http/1.1, no session tickets and no session cache (every new connection a full handshake,
    like lbd-tls's)."""
    tls_global = "" if tls is None else "    tune.ssl.cachesize 0\n"
    tls_bind = "" if tls is None else (
        f"    bind 127.0.0.1:{tls[0]} ssl crt {tls[1]} alpn http/1.1 ssl-min-ver TLSv1.2 no-tls-tickets"
        f" ciphers {TLS_CIPHERS}\n"
    )  # fmt: skip
    servers = "\n".join(
        f"    server s{i + 1} 127.0.0.1:{backend} check inter 2s" for i, backend in enumerate(backend_ports)
    )
    return f"""# generated by bench/stack.py
global
    nbthread {threads}
    stats socket {stats_socket} mode 600
{tls_global}defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend bench
    bind 127.0.0.1:{port}
{tls_bind}    default_backend nginx
backend nginx
    balance hdr(client-id)
    hash-type consistent
    option httpchk GET /health
{servers}
"""
