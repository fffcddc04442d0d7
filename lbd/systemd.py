"""Telling systemd how lbd is doing (sd_notify), for a unit with `Type=notify`: READY=1 once every
listener is bound, RELOADING=1 ... READY=1 around a reload, STOPPING=1 at the start of a graceful
stop. Without $NOTIFY_SOCKET (not started by systemd) every call does nothing."""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("lbd")


def notify(*fields: str) -> None:
    """Send `KEY=value` lines to systemd's notification socket, if there is one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        log.warning("cannot notify systemd on %s: %s", address, exc.strerror or exc)


def reloading() -> str:
    """The RELOADING=1 notice with the monotonic timestamp systemd 253+ asks for."""
    return f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
