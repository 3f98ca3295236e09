"""An in-process weight-sync wire: one GPU cannot hold two ranks of an NCCL group, so the checks that
send and receive on one device pass the broadcasts through this instead. It stands in for the wire
alone (a :class:`common.weight_sync.transport.Channel` of ``broadcast``/``barrier``/``drop``); the
packing, metadata, staging and unpacking are the project's own code.

Two ways:

- ``clone=True`` (sender and receiver on one thread, one after the other): the root's broadcasts are
  queued as copies (the sender reuses its staging buffers) and the receiver's take them in order.
- ``clone=False`` (receiver on another thread, as ``WorkerSync`` runs it): a root broadcast completes
  when the receiver has copied it, as on a real wire, so at most the buckets in flight exist twice.
"""

from __future__ import annotations

import datetime
import queue
import threading
from collections import deque


def _seconds(timeout) -> float | None:
    if isinstance(timeout, datetime.timedelta):
        return timeout.total_seconds()
    return timeout


class _Work:
    def __init__(self, fn=None) -> None:
        self.fn = fn

    def wait(self, timeout=None) -> bool:
        if self.fn is not None:
            self.fn(_seconds(timeout))
        return True


def _synchronize(t) -> None:
    if t.is_cuda:
        import torch

        torch.cuda.current_stream(t.device).synchronize()


class LoopbackWire:
    """The shared middle of the two ends; ``keep=False`` discards the root's broadcasts (a throughput
    run with no receiver)."""

    def __init__(self, clone: bool = True, keep: bool = True) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.clone, self.keep = clone, keep
        self.sent = 0

    def end(self, root: bool, device) -> LoopbackEnd:
        return LoopbackEnd(self, root, device)


class LoopbackEnd:
    """One rank's end (a Channel)."""

    def __init__(self, wire: LoopbackWire, root: bool, device) -> None:
        self.wire, self.root, self.device = wire, root, device
        self._posted: deque = deque()  # the receiver's broadcasts not waited on yet, in posting order

    def broadcast(self, t):
        if self.root:
            return self._send(t)
        item = [t, False]
        self._posted.append(item)
        return _Work(lambda timeout: self._receive_until(item, timeout))

    def _send(self, t):
        self.wire.sent += 1
        if not self.wire.keep:
            return _Work()
        _synchronize(t)  # what the sender wrote on its stream is complete before the other end reads
        done = threading.Event()
        self.wire.queue.put((t.clone() if self.wire.clone else t, done))
        if self.wire.clone:
            done.set()

        def wait(timeout):
            if not done.wait(timeout):
                raise RuntimeError(
                    f"loopback: the receiver did not take a broadcast (timed out after {timeout} s)"
                )

        return _Work(wait)

    def _receive_until(self, item, timeout) -> None:
        while not item[1]:  # the broadcasts posted before this one complete first, in order
            head = self._posted.popleft()
            try:
                src, done = self.wire.queue.get(timeout=timeout)
            except queue.Empty:
                raise RuntimeError(
                    f"loopback: no broadcast from the sender (timed out after {timeout} s)"
                ) from None
            dst = head[0]
            if src.numel() != dst.numel() or src.dtype != dst.dtype:
                raise RuntimeError(
                    f"loopback: receiver posted {dst.dtype} x {dst.numel()}, sender sent {src.dtype} x {src.numel()}"
                )
            dst.copy_(src)
            _synchronize(dst)
            done.set()
            head[1] = True

    def barrier(self):
        return _Work()

    def drop(self) -> None:
        """Nothing to release: no real group was built."""


class LoopbackTransport:
    """A :class:`common.weight_sync.transport.Transport` whose ``connect`` hands out the receiver's end
    of ``wire`` (on the connecting thread's current device for ``nccl``)."""

    def __init__(self, wire: LoopbackWire, backend: str) -> None:
        self.wire, self.backend = wire, backend

    def connect(self, store, rank: int, world_size: int, timeout) -> LoopbackEnd:
        import torch

        gpu = self.backend == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
        return self.wire.end(root=rank == 0, device=device)
