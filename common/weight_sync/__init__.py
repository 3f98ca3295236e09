"""Weight sync: a versioned, bucketed broadcast from learner rank 0 to every generator engine worker
over a group created for the purpose (never the default torch.distributed group), gloo on CPU and
NCCL on GPU through one code path.

Rooms:

- :mod:`~common.weight_sync.wire`: what an update is on the wire (header, msgpack metadata, the bucket
  plan, dtypes), the group info and the stats; pure, no torch.distributed.
- :mod:`~common.weight_sync.store`: the group's rendezvous ``TCPStore`` (the public record, rank
  claims) and who may use it (a random token per generation).
- :mod:`~common.weight_sync.transport`: the interface in front of the collective (``Transport`` →
  ``Channel``: broadcast, barrier, drop) and the one factory that picks it from ``sync.backend``;
  :mod:`~common.weight_sync.torch_dist` implements it with ``ProcessGroupGloo`` / ``ProcessGroupNCCL``.
- :mod:`~common.weight_sync.peer`, :mod:`~common.weight_sync.sender`,
  :mod:`~common.weight_sync.receiver`: the two ends (:class:`WeightSender` on learner rank 0,
  :class:`WeightReceiver` on each engine worker) and the timeout / dead-group rules they share.

Every wait has a timeout (store waits, building the group with its first collective, every
collective), NCCL's included: its watchdog's own timeout is far above the wait's and never tears the
process down (:mod:`~common.weight_sync.torch_dist`). A failure or timeout raises
:class:`common.errors.SyncError` naming the stage (connect, metadata or bucket k/B), aborts the group
and marks it dead: the fix is always to rebuild.

Join / rebuild protocol (the controller drives it; this package implements the group side). Whenever
membership changes — a generator restarts or is added, or a sync failed — the controller:

1. calls :meth:`WeightSender.rebuild` (new port, default: one the OS picks; new world size =
   1 + number of engine workers) on learner rank 0, which drops the old group and store, bumps the
   generation and returns a :class:`SyncGroupInfo`;
2. tells every generator, old and new, that info and each engine worker its rank
   (``offset of its engine + worker rank inside the engine``); each calls :meth:`WeightReceiver.rejoin`
   (or builds a new receiver with :meth:`WeightReceiver.from_info`);
3. runs a sync of the *current* weights and version (``send`` on rank 0, ``receive`` on every worker,
   concurrently). Old members re-apply the version they have (idempotent); the newcomer is now current.
   Nothing else restarts.
"""

from __future__ import annotations

from common.weight_sync.receiver import WeightReceiver
from common.weight_sync.sender import WeightSender
from common.weight_sync.store import CURRENT_KEY, new_token
from common.weight_sync.transport import Channel, Transport, Work, resolve_backend, transport_for
from common.weight_sync.wire import (
    ALIGN,
    DTYPES,
    MAGIC,
    MAX_METADATA_BYTES,
    SCHEMA_VERSION,
    ParamSlot,
    SyncGroupInfo,
    SyncMetadata,
    SyncStats,
    decode_metadata,
    dtype_name,
    encode_metadata,
    plan_buckets,
    validate_metadata,
)

__all__ = [
    "ALIGN",
    "CURRENT_KEY",
    "DTYPES",
    "MAGIC",
    "MAX_METADATA_BYTES",
    "SCHEMA_VERSION",
    "Channel",
    "ParamSlot",
    "SyncGroupInfo",
    "SyncMetadata",
    "SyncStats",
    "Transport",
    "WeightReceiver",
    "WeightSender",
    "Work",
    "decode_metadata",
    "dtype_name",
    "encode_metadata",
    "new_token",
    "plan_buckets",
    "resolve_backend",
    "transport_for",
    "validate_metadata",
]
