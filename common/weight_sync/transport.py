"""The interface in front of the collective: how a bucket gets from rank 0 to every receiver.

The sender and the receiver (:mod:`common.weight_sync.sender`, :mod:`common.weight_sync.receiver`) own
the protocol of an update (header, metadata, buckets, staging, stats, failure handling) and the group's
membership (:mod:`common.weight_sync.store`); what moves the bytes is a :class:`Transport`, chosen once
by :func:`transport_for` from ``sync.backend``. Once every receiver has claimed its rank, each rank
calls :meth:`Transport.connect` on the generation's prefixed store (its rendezvous) and gets a
:class:`Channel`: asynchronous broadcasts from rank 0 and a barrier, each returning a :class:`Work` that
the caller waits on with the group's timeout. A channel whose wait failed is dropped, never reused.

Today every backend is :mod:`common.weight_sync.torch_dist` (gloo on CPU, NCCL on GPU). Another
transport (shared memory, a filesystem) is a module here implementing these protocols plus its name
in :func:`transport_for`; nothing outside this package changes.
"""

from __future__ import annotations

import datetime
from typing import Protocol, get_args

import torch
from torch.distributed import Store

from common.config import SyncBackend
from common.errors import SyncError
from common.weight_sync.torch_dist import TorchDistTransport

BACKENDS = get_args(SyncBackend)  # sync.backend's values, declared with the field


class Work(Protocol):
    """One posted operation."""

    def wait(self, timeout: datetime.timedelta) -> object:
        """Block until the operation completed; raise (a timeout's text says "timed out") if it did not
        within ``timeout`` or failed."""
        ...


class Channel(Protocol):
    """One rank's end of a connected group."""

    device: torch.device  # where buffers handed to broadcast must live

    def broadcast(self, tensor: torch.Tensor) -> Work:
        """Post a broadcast of rank 0's ``tensor`` into every other rank's ``tensor`` (same size and
        dtype on every rank, posted in the same order); returns at once."""
        ...

    def barrier(self) -> Work:
        """Post an operation that completes once every rank has posted it."""
        ...

    def drop(self) -> None:
        """Release the group without blocking the caller (pending operations may never complete)."""
        ...


class Transport(Protocol):
    """A way of moving buckets: builds one rank's :class:`Channel` once the group is complete."""

    backend: str  # the name a receiver learns from the group's record and must share

    def connect(self, store: Store, rank: int, world_size: int, timeout: datetime.timedelta) -> Channel:
        """Build this rank's end of the group on ``store`` (the generation's keys; run concurrently on
        every rank); every later wait is bounded by ``timeout``."""
        ...


def resolve_backend(backend: str) -> str:
    """``auto`` → nccl where CUDA is available, else gloo."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in BACKENDS:
        allowed = ", ".join(repr(b) for b in BACKENDS[:-1]) + f" or {BACKENDS[-1]!r}"
        raise SyncError(f"sync.backend must be {allowed}, got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise SyncError(
            "sync.backend=nccl needs CUDA on this process; use sync.backend=gloo (or auto) on CPU"
        )
    return backend


def transport_for(backend: str) -> Transport:
    """The transport of a resolved backend name (as :func:`resolve_backend` returns it, or as a
    receiver reads it from the group's record)."""
    return TorchDistTransport(backend)
