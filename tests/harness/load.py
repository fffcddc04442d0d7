"""A load generator with exact per-request accounting, for fault tests and the soak benchmark.

Raw HTTP/1.1 over asyncio streams on uvloop, in a thread of its own: `connections` workers each keep
one connection (keep-alive unless a request says `close`), take request numbers from a shared
counter, paced to `rate` requests per second when given, and bounded by `max_requests` and
`max_duration_s`. Every request gets a `Result` saying how it ended, which is what "zero requests
lost" assertions need and what load tools' aggregate error counts cannot give:

- `ok`: a complete response (any status; `status` says which);
- `cut`: the response head arrived and the body did not complete (the connection closed or reset);
- `reset`: the connection closed or reset before a complete response head;
- `refused`: no connection could be opened;
- `timeout`: no complete response within `request_timeout_s`.

Retries, counted apart and only where an HTTP client may retry by itself (RFC 9112 §9.3.1):
`retry_refused_s` keeps reconnecting on a refused connection for that long (a client riding over
a restart of the server); `retry_stale` sends an idempotent request again, once, on a new
connection when a reused keep-alive connection closed before any response (the server closed it
as idle while the request was on its way).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import uvloop

OK = "ok"
CUT = "cut"
RESET = "reset"
REFUSED = "refused"
TIMEOUT = "timeout"

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
REFUSED_BACKOFF_S = 0.02
READ_LIMIT = 1 << 20  # largest response head we accept


@dataclass(frozen=True, slots=True)
class Request:
    method: str = "GET"
    path: str = "/echo"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    close: bool = False  # send `Connection: close`: the next request opens a new connection
    kind: str = ""  # a label for reports ("small", "upload", ...)

    def encode(self) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", "Host: lb.test"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        if self.body or self.method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(self.body)}")
        if self.close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


@dataclass(slots=True)
class Result:
    index: int
    kind: str
    started: float  # time.monotonic() when the request was first sent (or its connection attempted)
    ended: float
    outcome: str
    status: int = 0
    backend: str = ""  # X-Backend-Id of the response, when a head arrived
    connection_close: bool = False  # the response said `Connection: close`
    body_bytes: int = 0
    detail: str = ""  # why it failed; for an error status, the start of the body (lbd's one line)

    @property
    def latency_s(self) -> float:
        return self.ended - self.started

    @property
    def ok_200(self) -> bool:
        return self.outcome == OK and self.status == 200


@dataclass
class LoadReport:
    """What a run did. `results` holds every request (or only the failures: `keep_all=False`)."""

    results: list[Result] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)  # "200", "504", ..., "cut", "reset", ...
    refused_retries: int = 0
    stale_retries: int = 0
    connections_opened: int = 0
    started: float = 0.0
    ended: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def failures(self) -> list[Result]:
        return [result for result in self.results if not result.ok_200]

    @property
    def rate(self) -> float:
        return self.total / max(self.ended - self.started, 1e-9)


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.used = False

    def close(self) -> None:
        self.writer.close()


class _NoResponse(Exception):
    """The connection ended before a complete response head."""


class _Cut(Exception):
    """The response head arrived; its body did not complete."""


class LoadGenerator:
    def __init__(
        self,
        port: int,
        requests: Callable[[int], Request],
        *,
        connections: int = 16,
        rate: float | None = None,
        max_requests: int = 100_000,
        max_duration_s: float = 30.0,
        request_timeout_s: float = 10.0,
        retry_refused_s: float = 0.0,
        retry_stale: bool = True,
        keep_all: bool = True,
        host: str = "127.0.0.1",
    ) -> None:
        self.port = port
        self.host = host
        self.requests = requests
        self.connections = connections
        self.rate = rate
        self.max_requests = max_requests
        self.max_duration_s = max_duration_s
        self.request_timeout_s = request_timeout_s
        self.retry_refused_s = retry_refused_s
        self.retry_stale = retry_stale
        self.keep_all = keep_all
        self.report = LoadReport()
        self._issued = 0
        self._t0 = 0.0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    # --- control, from the test's thread -------------------------------------------------------

    def start(self) -> LoadGenerator:
        self.report.started = self._t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> LoadReport:
        """Take no new requests; wait for those in flight (each bounded by its timeout)."""
        self._stopping = True
        return self.wait()

    def wait(self) -> LoadReport:
        self._thread.join(self.max_duration_s + self.request_timeout_s + 10)
        assert not self._thread.is_alive(), "the load generator did not finish"
        return self.report

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def results_since(self, since: float) -> list[Result]:
        """Results of requests started at or after `since` (time.monotonic()), while running too."""
        return [result for result in list(self.report.results) if result.started >= since]

    # --- the run, in the load thread -----------------------------------------------------------

    def _run(self) -> None:
        loop = uvloop.new_event_loop()
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()
            self.report.ended = time.monotonic()

    async def _main(self) -> None:
        await asyncio.gather(*(self._worker() for _ in range(self.connections)))

    def _next_index(self) -> int | None:
        if self._stopping or self._issued >= self.max_requests:
            return None
        if time.monotonic() - self._t0 >= self.max_duration_s:
            return None
        index = self._issued
        self._issued += 1
        return index

    async def _worker(self) -> None:
        connection: _Connection | None = None
        while (index := self._next_index()) is not None:
            if self.rate:
                delay = self._t0 + index / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            connection = await self._one(index, self.requests(index), connection)
        if connection is not None:
            connection.close()

    async def _one(self, index: int, request: Request, connection: _Connection | None) -> _Connection | None:
        """Send one request (reconnecting and retrying as allowed) and record how it ended; returns
        the connection when it can carry the next request."""
        result = Result(index, request.kind, time.monotonic(), 0.0, RESET)
        data = request.encode()
        may_retry_stale = self.retry_stale and request.method in IDEMPOTENT
        try:
            async with asyncio.timeout(self.request_timeout_s):
                while True:
                    if connection is None:
                        connection = await self._connect()
                    reused = connection.used
                    connection.used = True
                    try:
                        connection.writer.write(data)
                        await connection.writer.drain()
                        await self._read_response(connection.reader, request, result)
                        break
                    except (_NoResponse, ConnectionError) as exc:
                        connection.close()
                        connection = None
                        if reused and may_retry_stale:
                            may_retry_stale = False
                            self.report.stale_retries += 1
                            continue
                        result.detail = f"no response: {exc!r}"
                        raise _NoResponse from exc
        except _NoResponse:
            result.outcome = RESET
        except _Cut as exc:
            result.outcome = CUT
            result.detail = str(exc)
        except TimeoutError:
            result.outcome = TIMEOUT
        except ConnectionRefusedError:
            result.outcome = REFUSED
        except OSError as exc:
            result.outcome = RESET
            result.detail = repr(exc)
        else:
            result.outcome = OK
        result.ended = time.monotonic()
        self._record(result)
        if result.outcome != OK or request.close or result.connection_close:
            if connection is not None:
                connection.close()
            return None
        return connection

    async def _connect(self) -> _Connection:
        """A new connection; on refusal, keep trying for `retry_refused_s` (a server restarting)."""
        give_up = time.monotonic() + self.retry_refused_s
        while True:
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port, limit=READ_LIMIT)
            except ConnectionRefusedError:
                if time.monotonic() >= give_up:
                    raise
                self.report.refused_retries += 1
                await asyncio.sleep(REFUSED_BACKOFF_S)
                continue
            self.report.connections_opened += 1
            return _Connection(reader, writer)

    async def _read_response(self, reader: asyncio.StreamReader, request: Request, result: Result) -> None:
        """Read one response into `result`, strictly framed (RFC 9112 §6.3); 1xx are skipped."""
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                raise _NoResponse(f"closed after {len(exc.partial)} bytes of the head") from None
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            if not 100 <= status < 200 or status == 101:
                break
        result.status = status
        result.backend = headers.get("x-backend-id", "")
        result.connection_close = "close" in headers.get("connection", "").lower()
        if request.method == "HEAD" or status in (101, 204, 304):
            return
        try:
            if "chunked" in headers.get("transfer-encoding", "").lower():
                while size := int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16):
                    result.body_bytes += len(await reader.readexactly(size + 2)) - 2
                await reader.readuntil(b"\r\n")  # no trailers expected: the empty line ending the body
            elif "content-length" in headers:
                body = await reader.readexactly(int(headers["content-length"]))
                result.body_bytes = len(body)
                if status >= 400:
                    result.detail = body[:200].decode("latin-1")
            else:
                result.body_bytes = len(await reader.read())
                result.connection_close = True
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise _Cut(f"{status} from {result.backend or '?'}: body cut after {result.body_bytes} bytes") from exc

    def _record(self, result: Result) -> None:
        report = self.report
        report.counts[str(result.status) if result.outcome == OK else result.outcome] += 1
        if self.keep_all or not result.ok_200:
            report.results.append(result)
