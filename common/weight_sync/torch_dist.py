"""The torch.distributed transport: ``ProcessGroupGloo`` (CPU tensors) or ``ProcessGroupNCCL`` (CUDA
tensors on ``torch.cuda.current_device()``) built directly on the generation's prefixed store, never
the default torch.distributed group, through one code path.

Every failure is a Python exception within the sync timeout, never a hang and never a killed process:

- Connecting (:func:`connect_group`) builds the group and completes a first one-element all-reduce on
  a side thread, waited for with the timeout: the communicator is created there (NCCL's eagerly, for
  this rank's device), not inside the first broadcast. A rank that claimed its place and died never
  completes it; the half-built group is aborted and the caller gets a timeout.
- Every collective is waited for by polling ``Work.is_completed`` against a deadline
  (:class:`TimedWork`), then ``wait()`` takes its result (an error raises; on CUDA the caller's stream
  is ordered after it).
- NCCL's own timeout (its watchdog's) is :func:`group_timeout`, well above the wait's, so our waits
  fail first (gloo has no watchdog: its operations time out with the wait); a failed group is aborted (``abort()``: NCCL aborts its
  communicators, which ends any pending init or collective; gloo's is a no-op) and released off the
  caller's thread.
- NCCL groups are built with ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2`` (abort the communicators, never tear
  the process down: torch's default ``3`` kills learner rank 0 or the engine when a watchdog fires) and
  a non-blocking communicator (``NCCLConfig.blocking=0``: its init and collectives return at once and
  can be aborted from another thread). ProcessGroupNCCL reads the variable in its constructor, so it is
  set only while this group is built; the learner's own groups keep torch's default.

NCCL cannot run on the CPU-only machines the suite runs on: the same functions run there with gloo.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
import time

import torch
from torch.distributed import AllreduceOptions, BroadcastOptions, ProcessGroupGloo, Store

GROUP_TIMEOUT_FACTOR = 4  # the group's own timeout, in waits ...
GROUP_TIMEOUT_MARGIN = datetime.timedelta(seconds=60)  # ... plus this
NCCL_ERROR_HANDLING = "2"  # TORCH_NCCL_ASYNC_ERROR_HANDLING: abort the communicators, keep the process
POLL_MAX_S = 0.001  # the longest sleep between two polls of a pending collective
_ENV_LOCK = threading.Lock()


def group_timeout(wait: datetime.timedelta) -> datetime.timedelta:
    """The process group's own timeout for waits of ``wait``: well above it, so every wait of ours
    fails (and aborts the group) before the group's watchdog would act."""
    return wait * GROUP_TIMEOUT_FACTOR + GROUP_TIMEOUT_MARGIN


def op_timeout(backend: str, wait: datetime.timedelta) -> datetime.timedelta:
    """The timeout a ``backend`` group applies to its own operations: NCCL's watchdog gets
    :func:`group_timeout` (it would abort the group, or with torch's default kill the process); gloo
    has no watchdog and fails its operations at the wait's timeout."""
    return group_timeout(wait) if backend == "nccl" else wait


@contextlib.contextmanager
def _nccl_error_handling(timeout: datetime.timedelta):
    """``TORCH_NCCL_ASYNC_ERROR_HANDLING`` for the group built inside (its constructor reads it). Also
    bounds how long torch polls a non-blocking communicator that never comes up (read once per process,
    used by non-blocking communicators only; an explicit setting is kept)."""
    key = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
    with _ENV_LOCK:
        os.environ.setdefault(
            "TORCH_NCCL_NONBLOCKING_TIMEOUT", str(int(group_timeout(timeout).total_seconds()))
        )
        old = os.environ.get(key)
        os.environ[key] = NCCL_ERROR_HANDLING
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def new_backend_pg(store: Store, rank: int, world_size: int, backend: str, timeout: datetime.timedelta):
    """A process group of ``backend`` on ``store`` whose own timeout is :func:`group_timeout` of the
    wait ``timeout``. gloo's constructor blocks until every rank built it (bounded by the store's
    timeout); NCCL's returns at once (:func:`connect_group` creates the communicator)."""
    if backend == "nccl":
        # a CPU-only torch build has no ProcessGroupNCCL: import it only where NCCL is asked for
        from torch.distributed import ProcessGroupNCCL

        opts = ProcessGroupNCCL.Options()
        opts._timeout = op_timeout(backend, timeout)
        opts.config.blocking = 0  # a non-blocking communicator: abort() ends a pending init or collective
        with _nccl_error_handling(timeout):
            return ProcessGroupNCCL(store, rank, world_size, opts)
    return ProcessGroupGloo(store, rank, world_size, op_timeout(backend, timeout))


def device_for(backend: str) -> torch.device:
    """Where the buffers of a ``backend`` group live."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _backend_of(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


class TimedWork:
    """A posted collective whose :meth:`wait` ends by its deadline (a :class:`~common.weight_sync.transport.Work`)."""

    def __init__(self, work) -> None:
        self.work = work

    def wait(self, timeout: datetime.timedelta) -> None:
        """Poll until the collective completed, at most ``timeout``; raise TimeoutError ("timed out")
        past it. A completed one's ``wait()`` raises its error, if any."""
        deadline = time.monotonic() + timeout.total_seconds()
        pause = 0.0001
        while not self.work.is_completed():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the collective timed out after {timeout.total_seconds():g} s")
            time.sleep(pause)
            pause = min(2 * pause, POLL_MAX_S)
        self.work.wait()


def barrier_work(pg, device: torch.device, timeout: datetime.timedelta) -> TimedWork:
    """A one-element all-reduce: completes once every rank has posted it."""
    opts = AllreduceOptions()
    opts.timeout = op_timeout(_backend_of(device), timeout)
    return TimedWork(pg.allreduce([torch.zeros(1, device=device)], opts))


def abort_group(pg) -> None:
    """Abort ``pg`` (NCCL: its communicators, ending whatever is pending on them) and release it off
    the caller's thread: a group's destructor may wait for its pending operations."""
    if pg is None:
        return
    abort = getattr(pg, "abort", None)
    if callable(abort):
        with contextlib.suppress(Exception):  # a group already torn down has nothing left to abort
            abort()
    threading.Thread(target=lambda _pg: None, args=(pg,), daemon=True, name="treepo-wsync-drop").start()


def _build(state: dict, lock: threading.Lock, store, rank, world_size, backend, timeout) -> None:
    """:func:`connect_group`'s side thread: the group into ``state["pg"]``, then its first all-reduce."""
    pg = new_backend_pg(store, rank, world_size, backend, timeout)
    with lock:
        state["pg"] = pg
        abandoned = state.get("abandoned", False)
    if abandoned:  # the caller gave up while the group was built: nobody else aborts it
        abort_group(pg)
        return
    device = device_for(backend)
    if backend == "nccl":
        pg.eager_connect_single_device(device)
    barrier_work(pg, device, timeout).wait(timeout)


def connect_group(store: Store, rank: int, world_size: int, backend: str, timeout: datetime.timedelta):
    """Build this rank's group and complete a first all-reduce on it (NCCL: the communicator is created
    here, for this rank's device), all within ``timeout``; raise TimeoutError ("timed out") past it,
    with the half-built group aborted. The work runs on a side thread: what it waits on (a rank that
    never comes) cannot outlast the caller's deadline."""
    device = device_for(backend)
    state: dict = {}
    lock = threading.Lock()
    done = threading.Event()

    def build() -> None:
        try:  # the side thread builds on the caller's CUDA device
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                _build(state, lock, store, rank, world_size, backend, timeout)
        except BaseException as e:  # handed to the caller
            state["error"] = e
        finally:
            done.set()

    threading.Thread(target=build, daemon=True, name="treepo-wsync-connect").start()
    finished = done.wait(timeout.total_seconds())
    if finished and "error" not in state:
        return state["pg"]
    with lock:
        state["abandoned"] = True
        pg = state.get("pg")
    abort_group(pg)
    if finished:
        raise state["error"]
    raise TimeoutError(
        f"building the {backend} group of {world_size} ranks timed out after {timeout.total_seconds():g} s"
    )


class TorchDistChannel:
    """One rank's end of a gloo/NCCL group (a :class:`common.weight_sync.transport.Channel`)."""

    def __init__(self, pg, device: torch.device, timeout: datetime.timedelta) -> None:
        self.pg = pg
        self.device = device
        self.timeout = timeout

    def broadcast(self, tensor: torch.Tensor) -> TimedWork:
        opts = BroadcastOptions()
        opts.rootRank = 0
        opts.timeout = op_timeout(_backend_of(self.device), self.timeout)
        return TimedWork(self.pg.broadcast([tensor], opts))

    def barrier(self) -> TimedWork:
        """A one-element all-reduce (a broadcast's root may finish before its receivers do)."""
        return barrier_work(self.pg, self.device, self.timeout)

    def drop(self) -> None:
        pg, self.pg = self.pg, None
        abort_group(pg)


class TorchDistTransport:
    """gloo or NCCL (a :class:`common.weight_sync.transport.Transport`)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def connect(
        self, store: Store, rank: int, world_size: int, timeout: datetime.timedelta
    ) -> TorchDistChannel:
        pg = connect_group(store, rank, world_size, self.backend, timeout)
        return TorchDistChannel(pg, device_for(self.backend), timeout)
