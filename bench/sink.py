"""A backend that reads a whole request body, discards it, then answers 200 (keep-alive).

    .venv/bin/python bench/sink.py PORT

nginx answers a body it does not want before reading it, so a proxy rightly stops forwarding the
rest; the upload check of bench/compare.py needs a backend that takes every byte. Serves GET /health
too (lbd's checks). Bodies need a Content-Length; every read has a 60 s timeout.
"""

from __future__ import annotations

import asyncio
import sys

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nok\n"
LENGTH_REQUIRED = b"HTTP/1.1 411 Length Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
CHUNK = 1 << 20
TIMEOUT_S = 60.0


def content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
        if name.strip().lower() == b"transfer-encoding":
            return None
    return 0


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Requests one after another on the connection until the peer closes or goes silent."""
    try:
        while True:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT_S)
            remaining = content_length(head)
            if remaining is None:
                writer.write(LENGTH_REQUIRED)
                break
            while remaining > 0:
                chunk = await asyncio.wait_for(reader.read(min(CHUNK, remaining)), TIMEOUT_S)
                if not chunk:
                    return
                remaining -= len(chunk)
            writer.write(OK)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=4096)  # bursts of health checks
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
