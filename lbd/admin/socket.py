"""The admin Unix socket: created owner-only, in a directory nobody else can tamper with, never over a
live daemon's socket."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

from lbd.errors import LbError

MAX_UNIX_PATH = 107


def bind_owner_only(path: Path) -> tuple[socket.socket, int]:
    """Bind a listening Unix socket at `path` with mode 0600.

    The umask is tightened around `bind` so there is no moment when the socket is reachable by
    others, and the directory must be safe (see `_check_directory`). A stale socket from a crashed
    daemon is replaced; a live one is refused. Returns the socket and the inode of its file, so
    shutdown removes the file only if it is still ours.
    """
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise LbError(f"admin socket path {path} is longer than {MAX_UNIX_PATH} bytes; choose a shorter one")
    if not path.parent.is_dir():
        try:
            path.parent.mkdir(mode=0o700, parents=True)
        except OSError as exc:
            raise LbError(f"cannot create the admin socket's directory {path.parent}: {exc.strerror}") from None
    _check_directory(path.parent)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise LbError(f"cannot create the admin socket {path}: {exc.strerror}") from None
    finally:
        os.umask(previous)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock, path.stat().st_ino


def _check_directory(directory: Path) -> None:
    """Refuse a directory in which another user could remove or replace the socket (and so answer
    lbctl in lbd's place): it must belong to lbd's user or root, and be writable by nobody else,
    unless it has the sticky bit (like /tmp), which lets only a file's owner remove the file."""
    info = directory.stat()
    if info.st_uid not in (0, os.geteuid()):
        raise LbError(
            f"admin socket directory {directory} belongs to uid {info.st_uid}, who could replace the socket; "
            "use a directory owned by lbd's user or root (e.g. $XDG_RUNTIME_DIR)"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        raise LbError(
            f"admin socket directory {directory} is writable by others (mode {stat.S_IMODE(info.st_mode):o}), "
            "who could replace the socket; remove their write permission (chmod go-w) or use a directory "
            "that is not shared (e.g. $XDG_RUNTIME_DIR)"
        )


def _remove_stale(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise LbError(f"admin socket path {path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except OSError:
        path.unlink(missing_ok=True)  # nobody listens: a crashed daemon's leftover
        return
    finally:
        probe.close()
    raise LbError(f"another lbd is already serving on {path}; stop it or use --admin-socket")


def remove_socket(path: Path, inode: int) -> None:
    """Remove the socket file only if it is still the one we bound (a successor may own the path)."""
    with contextlib.suppress(OSError):
        if path.stat().st_ino == inode:
            path.unlink()
