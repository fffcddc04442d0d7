"""The audit trail: every change an operator makes (through the admin API, a reload, a signal) as one
INFO line on logger `lbd.audit` saying who changed what, from what to what, and a count per action
for `/metrics` (`lbd_admin_changes_total{action}`).

Who: for the admin socket, the peer's credentials as the kernel reports them (SO_PEERCRED: uid and
pid, which no client can forge); for the TCP admin listener, the token holder's address; for a
signal, its name.
"""

from __future__ import annotations

import contextlib
import logging
import pwd
import socket
import struct
from collections import Counter
from typing import Any, Final

log = logging.getLogger("lbd.audit")
ACTIONS: Final = (
    "register",
    "deregister",
    "drain",
    "undrain",
    "capacity",
    "check",
    "mode",
    "sessions_clear",
    "reload",
)
_UCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid


class AuditTrail:
    def __init__(self, quiet: bool = False) -> None:
        self.counts: Counter[str] = Counter()
        self.quiet = quiet  # counts without a line: a worker, whose supervisor writes the audit trail

    def record(self, who: str, action: str, subject: str, change: str, **fields: Any) -> None:
        """One change: `subject` is what it applies to (a server id; "" when the action names it, as
        `mode`), `change` says what happened in words (`draining no -> yes`); `fields` go into the JSON
        log line as they are."""
        self.counts[action] += 1
        if self.quiet:
            return
        audit = {"action": action, "subject": subject, "by": who, **fields}
        what = f"{action} {subject}" if subject else action
        log.info("%s by %s: %s", what, who, change, extra={"audit": audit})


def peer(transport_socket: socket.socket | None, remote: str | None) -> str:
    """Who is on the other end of an admin connection, in words."""
    if transport_socket is not None and transport_socket.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            raw = transport_socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            pid, uid, _ = _UCRED.unpack(raw)
            return f"uid {uid} ({_user(uid)}, pid {pid})"
        return "the admin socket"
    return f"the admin token at {remote}" if remote else "the admin token"


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "no such user"
