"""The verifier pool: persistent subprocesses that run reward checks with a deadline.

Each worker is ``python -c`` running :func:`common.rewards.worker.worker_main`, speaking JSON lines
over pipes (no pickle, no ``multiprocessing`` re-import of ``__main__``). A call past its deadline
kills its worker (a fresh one starts on the next use); a crash is an ``error`` outcome. Workers are
stopped by pid, never by name, and end on their own when this process dies.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import queue
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from common.errors import RewardError

log = logging.getLogger(__name__)

BOOT = "from common.rewards.worker import worker_main; worker_main()"
MEMORY_ENV = "TREEPO_REWARD_WORKER_MEMORY_MB"
DEFAULT_WORKER_MEMORY_MB = 2048  # address space per verifier worker (sympy + math-verify need ~0.5 GB)


class _Timeout(Exception):
    pass


class _Crash(Exception):
    pass


class _Worker:
    """One verifier subprocess owned by this process (stopped by pid, never by name)."""

    def __init__(self, start_timeout_s: float, memory_mb: int = DEFAULT_WORKER_MEMORY_MB) -> None:
        paths = [p or os.getcwd() for p in sys.path]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="1")
        env[MEMORY_ENV] = str(int(memory_mb))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", BOOT],
            # own session: a Ctrl-C to the terminal's process group must not kill workers mid-call;
            # the parent closes them at exit and a watchdog ends them if the parent is killed
            start_new_session=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        self._buf = b""
        try:
            reply = self._read(time.monotonic() + start_timeout_s)
        except (_Timeout, _Crash) as e:
            self.kill()
            raise RewardError(
                f"reward worker did not start within {start_timeout_s:.0f} s ({type(e).__name__.strip('_')}): "
                f"check that `{sys.executable} -c 'import common.rewards, math_verify'` works"
            ) from None
        if not reply.get("ready"):
            self.kill()
            raise RewardError(f"reward worker sent {reply!r} instead of ready")

    def _read(self, deadline: float) -> dict:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Timeout
            # poll, not select: a Ray worker can hold more than 1024 descriptors
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            if not poller.poll(max(1, math.ceil(left * 1000))):
                raise _Timeout
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise _Crash(f"worker exited (code {self.proc.poll()})")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def request(self, req: dict, timeout_s: float) -> dict:
        try:
            self.proc.stdin.write(json.dumps(req, default=str).encode() + b"\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except (BrokenPipeError, OSError) as e:
            raise _Crash(f"worker pipe closed ({e})") from None
        return self._read(time.monotonic() + timeout_s)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("reward worker pid %d did not exit after SIGKILL", self.proc.pid)
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()  # type: ignore[union-attr]


class Outcome(NamedTuple):
    """Result of one isolated call: ``status`` is ok | timeout | error; ``value`` is set when ok."""

    status: str
    value: Any = None
    detail: str = ""


class VerifierPool:
    """A fixed number of persistent verifier subprocesses, started lazily and replaced after a kill.

    Thread-safe: each call takes an idle worker (waiting if all are busy). The deadline covers the
    evaluation only, not the wait for a worker nor a worker's start-up.
    """

    def __init__(
        self, num_workers: int = 2, start_timeout_s: float = 60.0, memory_mb: int = DEFAULT_WORKER_MEMORY_MB
    ) -> None:
        if num_workers < 1:
            raise RewardError(f"reward pool size {num_workers} < 1: use at least one worker")
        self.num_workers = num_workers
        self.memory_mb = int(memory_mb)  # each worker's address-space cap (0 = none)
        self.start_timeout_s = start_timeout_s
        self._idle: queue.LifoQueue[_Worker | None] = queue.LifoQueue()
        for _ in range(num_workers):
            self._idle.put(None)
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self._executor: ThreadPoolExecutor | None = None
        self.owner_pid = os.getpid()

    def _start(self) -> _Worker:
        w = _Worker(self.start_timeout_s, self.memory_mb)
        with self._lock:
            self._all.append(w)
        return w

    def _retire(self, w: _Worker) -> None:
        w.kill()
        with self._lock:
            if w in self._all:
                self._all.remove(w)

    def warm_up(self) -> None:
        """Start every worker now (start-up takes about a second each: sympy's import)."""
        workers = [self._idle.get() for _ in range(self.num_workers)]
        try:
            for i, w in enumerate(workers):
                if w is None or not w.alive():
                    workers[i] = self._start()
        finally:
            for w in workers:
                self._idle.put(w)

    def call(self, req: dict, timeout_s: float) -> Outcome:
        if self._closed:
            raise RewardError("reward pool is closed")
        w = self._idle.get()
        try:
            if w is None or not w.alive():
                if w is not None:
                    self._retire(w)
                w = None
                w = self._start()
            try:
                reply = w.request(req, timeout_s)
            except _Timeout:
                self._retire(w)
                w = None
                return Outcome("timeout", detail=f"no reply within {timeout_s} s")
            except _Crash as e:
                self._retire(w)
                w = None
                return Outcome("error", detail=str(e))
            if reply.get("ok"):
                return Outcome("ok", reply.get("value"))
            return Outcome("error", detail=str(reply.get("error")))
        finally:
            self._idle.put(w)

    def map(self, reqs: Sequence[dict], timeout_s: float) -> list[Outcome]:
        """Run requests concurrently on the pool's workers, each with its own deadline."""
        if len(reqs) <= 1:
            return [self.call(r, timeout_s) for r in reqs]
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="reward")
            ex = self._executor
        return list(ex.map(lambda r: self.call(r, timeout_s), reqs))

    def close(self) -> None:
        self._closed = True
        with self._lock:
            workers, self._all = list(self._all), []
            ex, self._executor = self._executor, None
        for w in workers:
            w.kill()
        if ex is not None:
            ex.shutdown(wait=False)


_SHARED: dict[tuple[int, int], VerifierPool] = {}
_SHARED_LOCK = threading.Lock()


def shared_pool(num_workers: int | None = None, memory_mb: int | None = None) -> VerifierPool:
    """This process's verifier pool of ``num_workers`` workers (``reward.workers``; default up to 4)
    capped at ``memory_mb`` each; re-created after a fork (pipes cannot be shared)."""
    n = num_workers or max(1, min(4, (os.cpu_count() or 2)))
    mem = DEFAULT_WORKER_MEMORY_MB if memory_mb is None else int(memory_mb)
    with _SHARED_LOCK:
        pool = _SHARED.get((n, mem))
        if pool is None or pool.owner_pid != os.getpid() or pool._closed:
            pool = _SHARED[(n, mem)] = VerifierPool(n, memory_mb=mem)
        return pool


@atexit.register
def _close_shared() -> None:
    for pool in list(_SHARED.values()):
        if pool.owner_pid == os.getpid():
            pool.close()


__all__ = [
    "BOOT",
    "DEFAULT_WORKER_MEMORY_MB",
    "MEMORY_ENV",
    "Outcome",
    "VerifierPool",
    "shared_pool",
]
