"""The workers' listening sockets: one per worker and listener, all bound to the same address with
SO_REUSEPORT, created and held by the supervisor.

Per-worker sockets let the kernel spread new connections evenly by a hash of their addresses (one
socket shared by every worker wakes whichever worker is idle, and the busiest ones win: the uneven
spread gunicorn and granian met). Their known cost is the accept queue: connections waiting in a
worker's queue are reset when its socket closes. The supervisor holds every socket for its whole
life and hands each to its worker, so a worker that dies leaves its socket open: the connections
queued there wait for the replacement, which inherits the same socket, instead of being reset.
"""

from __future__ import annotations

import socket

from lbd.config import Address

BACKLOG = 4096


def reuseport_sockets(address: Address, count: int) -> list[socket.socket]:
    """`count` listening sockets on `address` (port 0: the kernel picks one port for all)."""
    family, kind, proto, _, where = socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(where)
            where = sock.getsockname()  # the port the first one got, for the others
            sock.listen(BACKLOG)
            sock.set_inheritable(True)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise OSError(f"cannot listen on {address}: {exc.strerror}") from None
    return sockets


def bound_address(sock: socket.socket) -> Address:
    host, port = sock.getsockname()[:2]
    return Address(host, port)
