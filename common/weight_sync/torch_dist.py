"""The torch.distributed transport: ``ProcessGroupGloo`` (CPU tensors) or ``ProcessGroupNCCL`` (CUDA
tensors on ``torch.cuda.current_device()``) built directly on the generation's prefixed store, never
the default torch.distributed group, through one code path.

Every wait has a timeout: ``Work.wait(timeout)`` on every collective, and gloo's own operation timeout
is the same value. NCCL: ``ProcessGroupNCCL`` with its ``_timeout`` option and ``Work.wait(timeout)``
(which blocks the CPU until completion or the timeout). It cannot run on the CPU-only machines this is
tested on.
"""

from __future__ import annotations

import contextlib
import datetime
import threading

import torch
from torch.distributed import AllreduceOptions, BroadcastOptions, ProcessGroupGloo, Store


def new_backend_pg(store: Store, rank: int, world_size: int, backend: str, timeout: datetime.timedelta):
    """A process group of ``backend`` on ``store`` (blocks until every rank builds it)."""
    if backend == "nccl":
        # a CPU-only torch build has no ProcessGroupNCCL: import it only where NCCL is asked for
        from torch.distributed import ProcessGroupNCCL

        opts = ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return ProcessGroupNCCL(store, rank, world_size, opts)
    return ProcessGroupGloo(store, rank, world_size, timeout)


def device_for(backend: str) -> torch.device:
    """Where the buffers of a ``backend`` group live."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def drop_in_background(pg) -> None:
    """Release a dead group off the caller's thread: a gloo group's destructor waits for its pending
    ops (each bounded by the group timeout), NCCL's is aborted first."""
    if pg is None:
        return
    abort = getattr(pg, "abort", None)
    if callable(abort):
        with contextlib.suppress(Exception):  # a group already torn down has nothing left to abort
            abort()
    threading.Thread(target=lambda _pg: None, args=(pg,), daemon=True, name="treepo-wsync-drop").start()


class TorchDistChannel:
    """One rank's end of a gloo/NCCL group (a :class:`common.weight_sync.transport.Channel`)."""

    def __init__(self, pg, device: torch.device, timeout: datetime.timedelta) -> None:
        self.pg = pg
        self.device = device
        self.timeout = timeout

    def broadcast(self, tensor: torch.Tensor):
        opts = BroadcastOptions()
        opts.rootRank = 0
        opts.timeout = self.timeout
        return self.pg.broadcast([tensor], opts)

    def barrier(self):
        """A one-element all-reduce (a broadcast's root may finish before its receivers do)."""
        opts = AllreduceOptions()
        opts.timeout = self.timeout
        return self.pg.allreduce([torch.zeros(1, device=self.device)], opts)

    def drop(self) -> None:
        pg, self.pg = self.pg, None
        drop_in_background(pg)


class TorchDistTransport:
    """gloo or NCCL (a :class:`common.weight_sync.transport.Transport`)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def connect(
        self, store: Store, rank: int, world_size: int, timeout: datetime.timedelta
    ) -> TorchDistChannel:
        pg = new_backend_pg(store, rank, world_size, self.backend, timeout)
        return TorchDistChannel(pg, device_for(self.backend), timeout)
