"""The only module that knows how lbctl reaches lbd: HTTP/1.1 over the admin Unix socket.

Standard library only: a CLI that makes one small JSON call should start fast, and aiohttp would
cost more to import than the call itself takes.
"""

from __future__ import annotations

import errno
import http.client
import json
import socket
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT_S = 10.0


class DaemonUnreachable(Exception):
    """Nothing usable answers on the socket: no file, nobody listening, no answer, or not lbd."""

    def __init__(self, socket_path: Path, reason: str) -> None:
        super().__init__(f"cannot reach lbd at {socket_path} ({reason})")
        self.socket_path = socket_path
        self.reason = reason


class PermissionDenied(DaemonUnreachable):
    """The socket is there but not ours to use: lbd makes it owner-only (mode 0600)."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__(
            socket_path,
            "permission denied: the admin socket is owner-only; run lbctl as the user lbd runs as",
        )


class ApiError(Exception):
    """lbd answered with its error envelope; `code` is stable, `message` is meant for a person."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class UnixHTTPConnection(http.client.HTTPConnection):
    """`HTTPConnection` whose transport is an AF_UNIX socket instead of TCP."""

    def __init__(self, socket_path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Client:
    """One admin API call per connection: lbctl is short-lived, so keep-alive buys nothing."""

    def __init__(self, socket_path: Path, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body)

    def put(self, path: str, body: Any = None) -> Any:
        return self.request("PUT", path, body)

    def delete(self, path: str, timeout: float | None = None) -> Any:
        return self.request("DELETE", path, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        """Send one request; return the parsed JSON answer (None when the answer has no body).

        `timeout` overrides the client's for calls lbd answers only once it is done waiting
        (removing a server waits for its requests in flight).
        """
        status, data = self._exchange(method, path, body, self.timeout if timeout is None else timeout)
        if status >= 400:
            raise _api_error(status, data)
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise DaemonUnreachable(self.socket_path, "the answer is not JSON; is this an lbd socket?") from None

    def _exchange(self, method: str, path: str, body: Any, timeout: float) -> tuple[int, bytes]:
        headers = {"Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        connection = UnixHTTPConnection(self.socket_path, timeout)
        try:
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        except PermissionError:
            raise PermissionDenied(self.socket_path) from None
        except (OSError, http.client.HTTPException) as exc:
            raise DaemonUnreachable(self.socket_path, _reason(exc, timeout)) from None
        finally:
            connection.close()


def _reason(exc: OSError | http.client.HTTPException, timeout: float) -> str:
    """A few words on why the socket is not usable, for the one-line error."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "it closed the connection without answering"
    if isinstance(exc, http.client.HTTPException):
        return "the answer is not HTTP; is this an lbd socket?"
    if exc.errno == errno.ENOENT:
        return "no such file"
    if exc.errno == errno.ECONNREFUSED:
        return "connection refused; nobody is listening"
    return exc.strerror or str(exc)


def _api_error(status: int, data: bytes) -> ApiError:
    """Read lbd's envelope `{"error": {"code", "message"[, "field"]}}`; anything else still becomes one line."""
    try:
        error = json.loads(data)["error"]
        field = error.get("field")
        return ApiError(status, str(error["code"]), str(error["message"]), None if field is None else str(field))
    except (ValueError, TypeError, KeyError, AttributeError):
        text = data.decode(errors="replace").strip().splitlines()
        detail = f": {text[0][:200]}" if text else ""
        return ApiError(status, "http_error", f"lbd answered HTTP {status}{detail}")
