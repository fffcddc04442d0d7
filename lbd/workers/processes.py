"""The supervisor's workers as processes: start them, replace one that dies, stop them, and call
their private admin sockets.

A worker that exits while lbd is not stopping is started again at once; one that keeps dying is
started again after 0.5, 1, 2, 5, then 10 s, and each exit is logged with its code or signal. Its
listening sockets stay open in the supervisor meanwhile, so connections the kernel queued for it
wait for the replacement rather than being reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import aiohttp

from lbd.errors import LbError
from lbd.workers.protocol import READY, SERVING, Boot

log = logging.getLogger("lbd.workers")
RESTART_DELAYS_S: Final = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0)
STABLE_S: Final = 30.0  # a worker that ran this long before exiting is started again at once
START_TIMEOUT_S: Final = 60.0  # a first start on a slow, busy machine
CALL_TIMEOUT_S: Final = 5.0
KILL_AFTER_S: Final = 5.0  # beyond the shutdown grace, a worker that has not exited is killed
# the supervisor's alone: systemd takes readiness from it (NotifyAccess=main), and the secrets a
# worker needs come in its boot line, not its environment
PRIVATE_ENV: Final = frozenset({"NOTIFY_SOCKET", "LBD_ADMIN_TOKEN", "LBD_CLUSTER_PASSWORD"})


class WorkerProcess:
    """One worker: its process (replaced when it dies), its state and its admin socket."""

    def __init__(self, index: int, socket_path: Path, fds: list[int]) -> None:
        self.index = index
        self.socket_path = socket_path
        self.fds = fds
        self.process: asyncio.subprocess.Process | None = None
        self.started_at = 0.0  # monotonic
        self.restarts = 0
        self.ready = asyncio.Event()  # its admin socket answers
        self.serving = asyncio.Event()  # it accepts connections
        self.synced = False  # it takes state pushes (set before the first one)
        self._session: aiohttp.ClientSession | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def state(self) -> str:
        if self.serving.is_set():
            return "serving"
        return "starting" if self.alive else "exited"

    def uptime_s(self) -> float:
        return round(time.monotonic() - self.started_at, 3) if self.state != "exited" else 0.0

    async def spawn(self, boot: Boot) -> None:
        self.ready.clear()
        self.serving.clear()
        self.synced = False
        env = {key: value for key, value in os.environ.items() if key not in PRIVATE_ENV}
        # the worker's words come on a pipe of their own: its stdout is lbd's (an access log on "-")
        words, words_end = os.pipe()
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lbd", "worker",
                stdin=asyncio.subprocess.PIPE, pass_fds=[*self.fds, words_end], env=env,
            )  # fmt: skip
        except BaseException:
            os.close(words)
            raise
        finally:
            os.close(words_end)
        self.started_at = time.monotonic()
        assert self.process.stdin is not None
        line = dataclasses.replace(boot, words_fd=words_end).to_line()
        self.process.stdin.write(line)  # stdin stays open: its end tells the worker we are gone
        await self.process.stdin.drain()
        self._reader = asyncio.get_running_loop().create_task(self._read_words(words))

    async def _read_words(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
        try:
            async for line in reader:
                word = line.decode(errors="replace").strip()
                if word == READY:
                    self.ready.set()
                elif word == SERVING:
                    self.serving.set()
        finally:
            transport.close()

    async def exited(self) -> str:
        """Wait for the process to end; how it ended, in words."""
        assert self.process is not None
        code = await self.process.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self.serving.clear()
        self.ready.clear()
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    def signal(self, signum: signal.Signals) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    async def call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        """One request to the worker's admin socket: (status, JSON or text). OSError, TimeoutError
        or aiohttp.ClientError when it does not answer."""
        if self._session is None:
            connector = aiohttp.UnixConnector(path=str(self.socket_path))
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
            )
        async with self._session.request(method, f"http://worker{path}", json=body) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class Workers:
    """All the workers, kept running until `stop`."""

    def __init__(
        self,
        members: list[WorkerProcess],
        boot: Callable[[int], Boot],
        on_ready: Callable[[WorkerProcess], Awaitable[None]],
        stop_requested: Callable[[], bool] = lambda: False,
    ) -> None:
        self.members = members
        self._boot = boot  # built anew at each start: a replacement gets the config in effect
        self._on_ready = on_ready
        # lbd is stopping (a signal came): a worker that exits now was told to, maybe by the same
        # signal sent to the whole group (systemd's default KillMode): it is not started again
        self._stop_requested = stop_requested
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Start every worker and wait until each serves; LbError naming the first that cannot."""
        for worker in self.members:
            await self._launch(worker)
        for worker in self.members:
            await self._until_serving(worker)
        loop = asyncio.get_running_loop()
        self._watchers = [loop.create_task(self._keep_running(worker)) for worker in self.members]

    async def _launch(self, worker: WorkerProcess) -> None:
        await worker.spawn(self._boot(worker.index))
        task = asyncio.get_running_loop().create_task(self._when_ready(worker))
        self._tasks.add(task)  # held: the loop keeps only weak references to its tasks
        task.add_done_callback(self._tasks.discard)

    async def _when_ready(self, worker: WorkerProcess) -> None:
        assert worker.process is not None
        ready = asyncio.ensure_future(worker.ready.wait())
        gone = asyncio.ensure_future(worker.process.wait())
        await asyncio.wait((ready, gone), return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if ready.done():
            await self._on_ready(worker)
        else:
            ready.cancel()

    async def _until_serving(self, worker: WorkerProcess) -> None:
        serving = asyncio.ensure_future(worker.serving.wait())
        assert worker.process is not None
        gone = asyncio.ensure_future(worker.process.wait())
        done, _ = await asyncio.wait((serving, gone), timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        serving.cancel()
        gone.cancel()
        if serving not in done or not worker.serving.is_set():
            how = "did not start serving in time" if not done else f"exited (code {worker.process.returncode})"
            raise LbError(f"worker {worker.index} {how}; its log lines above say why")

    async def _keep_running(self, worker: WorkerProcess) -> None:
        failures = 0
        while True:
            how = await worker.exited()
            if self.stopping():
                return
            ran = time.monotonic() - worker.started_at
            failures = 0 if ran >= STABLE_S else failures + 1
            delay = RESTART_DELAYS_S[min(failures, len(RESTART_DELAYS_S) - 1)]
            log.warning(
                "worker %d (pid %s) %s after %.1f s; starting a new one%s",
                worker.index, worker.pid, how, ran, f" in {delay:g} s" if delay else "",
            )  # fmt: skip
            await asyncio.sleep(delay)
            if self.stopping():
                return
            worker.restarts += 1
            await self._launch(worker)

    def stopping(self) -> bool:
        return self._stopping or self._stop_requested()

    async def stop(self, grace_s: float) -> None:
        """SIGTERM every worker (each finishes its requests within `grace_s`), then kill stragglers."""
        self._stopping = True
        for worker in self.members:
            worker.signal(signal.SIGTERM)
        waits = [asyncio.ensure_future(w.process.wait()) for w in self.members if w.process is not None]
        _, late = await asyncio.wait(waits, timeout=grace_s + KILL_AFTER_S) if waits else (set(), set())
        if late:
            log.warning("%d workers did not stop within the grace period; killing them", len(late))
            for worker in self.members:
                worker.signal(signal.SIGKILL)
            await asyncio.wait(late)
        for task in self._watchers:
            task.cancel()
        for worker in self.members:
            await worker.close()

    def serving(self) -> list[WorkerProcess]:
        return [worker for worker in self.members if worker.serving.is_set()]

    async def each(self, method: str, path: str, body: object = None) -> list[tuple[WorkerProcess, int, Any]]:
        """The same call to every serving worker at once; a worker that does not answer is left out."""
        targets = self.serving()
        answers = await asyncio.gather(*(w.call(method, path, body) for w in targets), return_exceptions=True)
        return [
            (worker, *answer)
            for worker, answer in zip(targets, answers, strict=True)
            if not isinstance(answer, BaseException)
        ]
