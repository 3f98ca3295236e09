"""How the torch.distributed transport turns NCCL's failure modes into timeouts the sender can raise
as SyncError (:mod:`common.weight_sync.torch_dist`), checked on CPU where NCCL cannot run:

- an NCCL group is built with its own (watchdog) timeout well above the wait's, a non-blocking
  communicator and ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2`` for that group only (a stand-in records what
  ``ProcessGroupNCCL`` was given);
- connecting completes a first collective within the timeout: a group whose communicator never comes
  up (NCCL's lazy init waiting for a rank that died after claiming its place) is a timeout in time,
  and the half-built group is aborted;
- a collective that never completes is a timeout by its deadline, never a blocking wait.
"""

from __future__ import annotations

import datetime
import os
import threading
import time

import pytest
import torch
import torch.distributed

from common.weight_sync import torch_dist

TIMEOUT = datetime.timedelta(seconds=1)
SLACK_S = 1.0


class Pending:
    """A posted collective that never completes (a peer that never joins)."""

    def is_completed(self) -> bool:
        return False

    def wait(self, timeout=None) -> None:  # a blocking wait would never return
        raise AssertionError("wait() on a pending collective blocks until the watchdog fires")


class Completed:
    def __init__(self) -> None:
        self.waited = False

    def is_completed(self) -> bool:
        return True

    def wait(self, timeout=None) -> None:
        self.waited = True


class NeverUp:
    """A group whose communicator never comes up: collectives stay pending; abort() is recorded."""

    def __init__(self) -> None:
        self.aborted = threading.Event()

    def allreduce(self, tensors, opts=None):
        return Pending()

    def broadcast(self, tensors, opts=None):
        return Pending()

    def abort(self) -> None:
        self.aborted.set()


def test_group_timeout_is_well_above_the_wait():
    for seconds in (1, 120, 600):
        wait = datetime.timedelta(seconds=seconds)
        assert torch_dist.group_timeout(wait) >= 2 * wait + datetime.timedelta(seconds=30)
    assert torch_dist.op_timeout("nccl", TIMEOUT) == torch_dist.group_timeout(TIMEOUT)
    assert torch_dist.op_timeout("gloo", TIMEOUT) == TIMEOUT  # no watchdog: fails with the wait


def test_nccl_group_gets_a_high_watchdog_timeout_nonblocking_comms_and_clean_up_only(monkeypatch):
    built = {}

    class FakeNCCL:
        class NCCLConfig:
            blocking = 1

        class Options:
            def __init__(self) -> None:
                self._timeout = datetime.timedelta(minutes=10)
                self.config = FakeNCCL.NCCLConfig()

        def __init__(self, store, rank, size, opts) -> None:
            built.update(
                rank=rank,
                size=size,
                timeout=opts._timeout,
                blocking=opts.config.blocking,
                env=os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"),
            )

    monkeypatch.setattr(torch.distributed, "ProcessGroupNCCL", FakeNCCL, raising=False)
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # torch's default: tear the process down
    monkeypatch.delenv("TORCH_NCCL_NONBLOCKING_TIMEOUT", raising=False)
    torch_dist.new_backend_pg(object(), 0, 3, "nccl", TIMEOUT)
    assert built == {
        "rank": 0,
        "size": 3,
        "timeout": torch_dist.group_timeout(TIMEOUT),
        "blocking": 0,
        "env": "2",
    }
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"  # the process's other groups keep theirs
    assert os.environ["TORCH_NCCL_NONBLOCKING_TIMEOUT"] == "64"  # a pending init ends with the group timeout


def test_a_collective_that_never_completes_times_out_by_its_deadline():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out after 1 s"):
        torch_dist.TimedWork(Pending()).wait(TIMEOUT)
    assert TIMEOUT.total_seconds() <= time.monotonic() - t0 <= TIMEOUT.total_seconds() + SLACK_S
    done = Completed()
    torch_dist.TimedWork(done).wait(TIMEOUT)
    assert done.waited  # its result (and error, if any) is taken


def test_connect_times_out_and_aborts_a_group_whose_communicator_never_comes_up(monkeypatch):
    group = NeverUp()
    monkeypatch.setattr(torch_dist, "new_backend_pg", lambda *args: group)
    transport = torch_dist.TorchDistTransport("gloo")
    result: dict = {}

    def connect() -> None:
        t0 = time.monotonic()
        try:
            transport.connect(object(), 0, 2, TIMEOUT)
        except Exception as e:
            result["error"] = e
        result["elapsed"] = time.monotonic() - t0

    th = threading.Thread(target=connect, daemon=True)
    th.start()
    th.join(TIMEOUT.total_seconds() + SLACK_S + 5)
    assert not th.is_alive(), "connect hangs on a group whose communicator never comes up"
    assert isinstance(result.get("error"), TimeoutError) and "timed out" in str(result["error"])
    assert result["elapsed"] <= TIMEOUT.total_seconds() + SLACK_S
    assert group.aborted.wait(5), "the half-built group was not aborted"


def test_connect_hands_back_the_builders_error(monkeypatch):
    def refuse(*args):
        raise RuntimeError("address in use")

    monkeypatch.setattr(torch_dist, "new_backend_pg", refuse)
    with pytest.raises(RuntimeError, match="address in use"):
        torch_dist.TorchDistTransport("gloo").connect(object(), 0, 2, TIMEOUT)
