"""What both ends of a weight-sync group share: one connected group of one generation, its timeout on
every wait, and the rule that a failed wait kills the group.

A failure or timeout raises :class:`SyncError` naming the stage (metadata or bucket k/B) and marks the
group dead: NCCL has no recovery and a gloo group whose ranks disagree on the op sequence cannot be
resumed. The fix is always the same: rebuild.
"""

from __future__ import annotations

import abc
import datetime

import torch

from common.errors import SyncError
from common.weight_sync.transport import Channel, Work


class GroupPeer(abc.ABC):
    """State shared by both ends: one connected group of one generation."""

    def __init__(self, rank: int, world_size: int, backend: str, timeout_s: float) -> None:
        if world_size < 2:
            raise SyncError(
                f"a weight-sync group needs the sender and at least one receiver (world_size={world_size})"
            )
        if not 0 <= rank < world_size:
            raise SyncError(f"weight-sync rank {rank} is outside world size {world_size}")
        if timeout_s <= 0:
            raise SyncError(f"sync.timeout_s must be > 0 (got {timeout_s})")
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.timeout_s = float(timeout_s)
        self.timeout = datetime.timedelta(seconds=self.timeout_s)
        self.channel: Channel | None = None
        self.device = torch.device("cpu")
        self.broken: str = ""

    def _check_usable(self) -> None:
        if self.broken:
            raise SyncError(
                f"this weight-sync group is dead ({self.broken}); rebuild it on a new port and rejoin"
            )

    def _bcast(self, tensor: torch.Tensor) -> Work:
        return self.channel.broadcast(tensor)

    def _wait(self, work: Work, stage: str, where: str) -> None:
        try:
            work.wait(self.timeout)
        except Exception as e:  # gloo/NCCL raise RuntimeError subclasses (DistError, ...) with the cause text
            raise self._fail(stage, where, e) from e

    def _drop_channel(self) -> None:
        """Forget the group and release it in the background (it is dead or being replaced)."""
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.drop()

    def _fail(self, stage: str, where: str, e: BaseException) -> SyncError:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        timed_out = "timed out" in text.lower() or "timeout" in text.lower()
        what = (
            f"timed out after {self.timeout_s:g} s" if timed_out else f"failed ({type(e).__name__}: {text})"
        )
        self.broken = f"{stage} {what}"
        self._drop_channel()
        return SyncError(
            f"{where} {what} at {stage}; the group is dead: rebuild it on a new port "
            "(WeightSender.rebuild) and rejoin every receiver (WeightReceiver.rejoin)"
        )

    def connect(self) -> None:
        """Join the group now rather than at the first update (every rank connects concurrently): the
        sender waits (≤ timeout_s) until every receiver claimed its rank; a receiver reaches the store,
        checks the group is the one it was told about and claims its rank; then the group is built."""
        self._check_usable()
        self._ensure_connected()

    def _ensure_connected(self) -> None:
        if self.channel is None:
            channel = self._join()
            self.channel, self.device = channel, channel.device

    def barrier(self) -> None:
        """Returns once every rank of the group reached it (a broadcast's root may finish before its
        receivers do; timeout applies). For benchmarks and controllers that need "every receiver has
        the update"."""
        self._check_usable()
        self._ensure_connected()
        self._wait(self.channel.barrier(), "barrier", self._where())

    @abc.abstractmethod
    def _where(self) -> str:
        """Who waits on whom, for error messages."""

    @abc.abstractmethod
    def _join(self) -> Channel:
        """Join the group of this generation (not joined yet); this rank's end of it."""
