"""Receiving weight-sync updates inside an engine worker: join the group, receive in a background
thread while the engine keeps generating, stage the tensors, hand them over when the owner applies them.

:class:`WorkerSync` is plain threading over :class:`common.weight_sync.WeightReceiver` (no vLLM import):
the vLLM worker extension (:class:`actors.backends.vllm_backend.TreepoWorkerExtension`) holds one per
worker process and forwards ``collective_rpc`` calls to it, and tests drive it directly.

Rules:

- :meth:`WorkerSync.start` returns at once; the receive runs in a daemon thread. Every wait inside
  it is bounded by ``sync.timeout_s`` (store, rendezvous, header, metadata, each bucket), so the
  thread always ends: with the update staged (state ``done``) or with a message (state ``failed``).
  Nothing the thread raises is lost: :meth:`poll` reports it, :meth:`wait` raises it as ``SyncError``.
- Staged updates are kept by policy version until taken. :meth:`take` hands over one version and drops
  every older one (a newer update replaces an older one not applied yet); a completed receive of a
  version already staged replaces it (same version, same weights: a re-sync after a group rebuild).
  At most two copies are held: the one not applied yet and the one arriving.
- :meth:`join` targets a new group; a receive still running on the old group is superseded (its
  outcome is ignored; the dead group makes it fail fast or time out). Staged updates survive a join.
- On CUDA the thread receives on a stream of its own on the caller's device (a new thread starts on
  device 0, and the model's stream must not wait on the broadcasts): the engine keeps computing.

Memory: a staged update is a full, unsharded copy of the weights in the worker's HOST memory until it
is applied (with tensor parallelism every worker holds one). On GPU each tensor is copied to the host
as its bucket arrives, so the GPU holds only the buckets in flight (~two of ``sync.bucket_mb``) beside
the engine, not a second copy of the model; applying reloads from the host copy layer by layer.
"""

from __future__ import annotations

import contextlib
import threading
import time
import typing
from collections.abc import Mapping
from typing import Any

import torch

from common.config import SyncReceiver
from common.errors import ConfigError, SyncError
from common.weight_sync import WeightReceiver

RECEIVER_MODES = typing.get_args(SyncReceiver)  # sync.receiver's values, declared with the field


def receives_per_worker(mode: str, *, engine_in_workers: bool, supports_workers: bool) -> bool:
    """Whether the engine's workers are the weight-sync receivers (``sync.receiver``): ``auto`` = yes
    when the backend supports it and its engine runs in worker processes; ``generator`` = never;
    ``engine_workers`` = always (an error where the backend cannot)."""
    if mode == "generator":
        return False
    if mode == "engine_workers":
        if not supports_workers:
            raise ConfigError(
                "sync.receiver=engine_workers needs the vLLM backend (its workers join the weight-sync "
                "group): set generators.backend=vllm or sync.receiver=auto"
            )
        return True
    if mode == "auto":
        return supports_workers and engine_in_workers
    raise ConfigError(f"sync.receiver={mode!r} is not one of {', '.join(RECEIVER_MODES)}")


def _to_host(t: torch.Tensor) -> torch.Tensor:
    return t.to("cpu") if t.is_cuda else t


class WorkerSync:
    """One receiver rank: join / start / poll / wait / take / discard / close. Thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._receiver: WeightReceiver | None = None
        self._ticket = 0  # bumped by start and join: a thread's outcome counts only while it is current
        self._state = "idle"  # idle | receiving | done | failed
        self._error = ""
        self._version: int | None = None  # version of the last completed receive
        self._seconds = 0.0
        self._thread: threading.Thread | None = None
        self._staged: dict[int, list[tuple[str, torch.Tensor]]] = {}

    @property
    def rank(self) -> int | None:
        return None if self._receiver is None else self._receiver.rank

    def join(self, info: Mapping[str, Any], rank: int, timeout_s: float) -> int:
        """Target group ``info`` as ``rank`` (connects when the next receive starts). Returns the rank."""
        new = WeightReceiver.from_info(dict(info), int(rank), timeout_s=float(timeout_s))
        with self._cond:
            old, self._receiver = self._receiver, new
            self._ticket += 1
            self._state, self._error, self._version = "idle", "", None
            self._cond.notify_all()
        if old is not None:
            old.close()
        return new.rank

    def start(self) -> None:
        """Start receiving the next update in a background thread; returns at once."""
        device = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            device = torch.cuda.current_device()  # the engine's device, set on the calling thread only
        with self._cond:
            if self._receiver is None:
                raise SyncError("this engine worker has no weight-sync group: join one before receiving")
            if self._state == "receiving":
                raise SyncError(
                    f"weight-sync rank {self._receiver.rank}: a receive is already running; wait for it first"
                )
            self._ticket += 1
            self._state, self._error, self._version = "receiving", "", None
            thread = threading.Thread(
                target=self._run,
                args=(self._ticket, self._receiver, device),
                daemon=True,
                name=f"treepo-wsync-recv-{self._receiver.rank}",
            )
            self._thread = thread
        thread.start()

    def _run(self, ticket: int, receiver: WeightReceiver, device: int | None) -> None:
        t0 = time.perf_counter()
        stream_ctx: Any = contextlib.nullcontext()
        try:
            if device is not None:
                torch.cuda.set_device(device)
                stream_ctx = torch.cuda.stream(torch.cuda.Stream(device))
            with stream_ctx:
                version, stream = receiver.receive()
                # CPU: views into per-bucket buffers (no copy); GPU: each tensor to the host as its
                # bucket arrives, so no second copy of the model waits in GPU memory
                weights = [(name, _to_host(t)) for name, t in stream]
        except BaseException as e:  # the thread must report every failure, never die silently
            text = str(e).strip() or type(e).__name__
            if not isinstance(e, SyncError):
                text = f"{type(e).__name__}: {text}"
            msg = f"{text} (sync.timeout_s={receiver.timeout_s:g})"
            with self._cond:
                if ticket == self._ticket:
                    self._state, self._error = "failed", msg
                    self._seconds = time.perf_counter() - t0
                    self._cond.notify_all()
            return
        with self._cond:
            if ticket != self._ticket:  # superseded by a join: this group's outcome no longer counts
                return
            self._staged[int(version)] = weights
            self._state, self._version = "done", int(version)
            self._seconds = time.perf_counter() - t0
            self._cond.notify_all()

    def poll(self) -> dict[str, Any]:
        """``{"state", "version", "error", "seconds", "rank", "staged"}`` of the current receive."""
        with self._cond:
            return {
                "state": self._state,
                "version": self._version,
                "error": self._error,
                "seconds": self._seconds,
                "rank": self.rank,
                "staged": sorted(self._staged),
            }

    def wait(self, timeout_s: float | None = None) -> int:
        """Block until the current receive ends; returns its version. Raises :class:`SyncError` if it
        failed, if none was started, or if it is still running after ``timeout_s`` (None: until it ends,
        which the transport's timeouts bound)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._state == "receiving":
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise SyncError(
                        f"weight-sync rank {self.rank}: the receive is still running after {timeout_s:g} s"
                    )
                self._cond.wait(left)
            if self._state == "failed":
                raise SyncError(self._error)
            if self._state != "done":
                raise SyncError(f"weight-sync rank {self.rank}: no receive was started since the last join")
            return int(self._version)

    def take(self, version: int) -> list[tuple[str, torch.Tensor]]:
        """The staged tensors of ``version`` (removed from here, with every older staged update)."""
        with self._cond:
            weights = self._staged.pop(int(version), None)
            if weights is None:
                raise SyncError(
                    f"weight-sync rank {self.rank}: no staged update of version {version} "
                    f"(staged: {sorted(self._staged) or 'none'}); receive it before applying"
                )
            for v in [v for v in self._staged if v < int(version)]:
                del self._staged[v]
        return weights

    def discard(self, version: int | None = None) -> None:
        """Drop the staged update of ``version`` (None: every staged update)."""
        with self._cond:
            if version is None:
                self._staged.clear()
            else:
                self._staged.pop(int(version), None)

    def close(self) -> None:
        """Leave the group and drop staged updates; a running receive is superseded."""
        with self._cond:
            old, self._receiver = self._receiver, None
            self._ticket += 1
            self._state, self._error, self._version = "idle", "", None
            self._staged.clear()
            self._cond.notify_all()
        if old is not None:
            old.close()
