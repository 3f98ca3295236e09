"""Rank 0 of the weight-sync group, on learner rank 0: opens the group's store, waits for every
receiver, and broadcasts one update at a time (:mod:`common.weight_sync.wire` says what goes out).

Connecting is lazy (first :meth:`WeightSender.send`) or explicit (``connect()``), and must run
concurrently with every receiver's. Join / rebuild: whenever membership changes (a generator restarts
or is added, or a sync failed), the controller calls :meth:`WeightSender.rebuild` (new port, default
one the OS picks; new world size = 1 + number of engine workers), which drops the old group and store,
bumps the generation and returns the :class:`SyncGroupInfo` every receiver rejoins with; then it runs a
sync of the *current* weights and version (see :mod:`common.weight_sync`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence

import torch

from common.config import SyncConfig
from common.errors import SyncError
from common.weight_sync.peer import GroupPeer
from common.weight_sync.store import (
    group_store,
    new_token,
    open_master_store,
    publish_group,
    rank_keys,
    unclaimed_ranks,
)
from common.weight_sync.transport import Channel, resolve_backend, transport_for
from common.weight_sync.wire import (
    MAGIC,
    SCHEMA_VERSION,
    ParamSlot,
    SyncGroupInfo,
    SyncMetadata,
    SyncStats,
    as_bytes,
    dtype_name,
    encode_metadata,
    plan_buckets,
)


class WeightSender(GroupPeer):
    """Rank 0 of the weight-sync group, on learner rank 0; master of the group's TCP store.

    ``port=0`` lets the OS pick a free port (read it back from :attr:`info`). Construction only opens
    the store; the group connects on :meth:`connect` or the first :meth:`send`, waiting at most
    ``timeout_s`` for all ``world_size - 1`` receivers.
    """

    def __init__(
        self,
        host: str,
        port: int,
        world_size: int,
        backend: str = "auto",
        timeout_s: float = 120.0,
        bucket_mb: float = 64.0,
        generation: int = 0,
        token: str | None = "",
    ) -> None:
        super().__init__(0, world_size, resolve_backend(backend), timeout_s)
        self.transport = transport_for(self.backend)
        # None: secured, a new random token per generation; '': unsecured; else this token first
        self.secured = token != ""
        self.token = new_token() if token is None else token
        if bucket_mb <= 0:
            raise SyncError(f"sync.bucket_mb must be > 0 (got {bucket_mb})")
        self.host = host
        self.bucket_bytes = int(bucket_mb * (1 << 20))
        self.generation = int(generation)
        self.store = None
        self._staging: list[torch.Tensor] = []
        self._open_store(port)

    @classmethod
    def from_config(
        cls, cfg: SyncConfig, host: str, port: int, world_size: int, generation: int = 0
    ) -> WeightSender:
        """From a :class:`common.config.SyncConfig`; secured (a random token per generation)."""
        return cls(host, port, world_size, cfg.backend, cfg.timeout_s, cfg.bucket_mb, generation, token=None)

    def _open_store(self, port: int) -> None:
        self.store = open_master_store(self.host, port, self.timeout)
        self.port = int(self.store.port)
        publish_group(self.store, self.generation, self.world_size, self.backend, self.token)

    @property
    def info(self) -> SyncGroupInfo:
        return SyncGroupInfo(self.host, self.port, self.world_size, self.generation, self.backend, self.token)

    def _where(self) -> str:
        return (
            f"weight sync to {self.world_size - 1} receivers (generation {self.generation}, "
            f"{self.host}:{self.port})"
        )

    def _join(self) -> Channel:
        """Wait (≤ timeout_s) until every receiver claimed its rank, then build the group."""
        store = group_store(self.store, self.generation, self.token)
        t0 = time.monotonic()
        try:
            store.wait(rank_keys(self.world_size), self.timeout)
        except Exception as e:  # DistStoreError on timeout
            missing = unclaimed_ranks(store, self.world_size)
            self.broken = f"receivers {missing} never joined"
            raise SyncError(
                f"{self._where()} timed out after {time.monotonic() - t0:.1f} s waiting for receiver ranks "
                f"{missing} to join; check that those generators got this group's info, or rebuild the "
                f"group with the current membership ({type(e).__name__})"
            ) from e
        try:
            return self.transport.connect(store, 0, self.world_size, self.timeout)
        except Exception as e:
            raise self._fail("connect", self._where(), e) from e

    def rebuild(self, port: int = 0, world_size: int | None = None) -> SyncGroupInfo:
        """Drop the current group and store, open generation+1 on ``port`` (0 = any free port) with
        ``world_size`` (default: unchanged). Give the returned info to every receiver."""
        self._drop_channel()
        self.store = None  # closes the old master's listening socket
        if world_size is not None:
            if world_size < 2:
                raise SyncError(f"a weight-sync group needs at least one receiver (world_size={world_size})")
            self.world_size = int(world_size)
        self.generation += 1
        if self.secured:
            self.token = new_token()  # a receiver of an older generation cannot join this one
        self.broken = ""
        self._open_store(port)
        return self.info

    def send(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        version: int,
        spec: Sequence[tuple[str, torch.dtype, Sequence[int]]] | None = None,
    ) -> SyncStats:
        """Broadcast ``named_tensors`` as policy ``version`` to every receiver; returns this rank's stats.

        Without ``spec`` the iterable is listed first (it holds references, so a generator of full
        tensors — FSDP gathers — is held whole). With ``spec`` = [(name, dtype, shape)] in the
        iterator's order (e.g. from ``module.named_parameters()``: a DTensor's shape is the full
        shape), tensors are pulled one bucket at a time and checked against it: at most two buckets
        plus the largest tensor of the iterator's tensors are alive at once (the learner's
        ``weights_spec`` gives it).
        """
        self._check_usable()
        t0 = time.perf_counter()
        if spec is None:
            items = list(named_tensors)
            spec = [(n, t.dtype, tuple(t.shape)) for n, t in items]
            stream: Iterator[tuple[str, torch.Tensor]] = iter(items)
        else:
            stream = iter(named_tensors)
        if not spec:
            raise SyncError("weight sync was given no tensors to send")
        meta = plan_buckets(spec, self.bucket_bytes, version)
        self._ensure_connected()
        where = self._where()
        self._send_metadata(meta, where)
        try:
            self._send_buckets(meta, stream, where)
        except Exception as e:
            if self.broken:  # a failed or timed-out wait: already a SyncError naming the stage
                raise
            # the iterator raised or broke its spec: the receivers are mid-update and cannot resync, so
            # drop the group now (they fail fast on the closed connection instead of timing out)
            self.broken = f"sender aborted mid-update ({type(e).__name__})"
            self._drop_channel()
            if isinstance(e, SyncError):
                raise
            raise SyncError(
                f"{where}: the tensor iterator raised {type(e).__name__}: {e}; the group is dead"
            ) from e
        if self.device.type == "cuda":  # the caching allocator makes re-allocation cheap: free GPU memory
            self._staging = []
        if next(stream, None) is not None:
            raise SyncError(
                f"weight sync: the tensor iterator yields more than the {len(meta.params)} in its spec"
            )
        return SyncStats.of(meta, time.perf_counter() - t0, self.world_size - 1)

    def _send_metadata(self, meta: SyncMetadata, where: str) -> None:
        """The header, then the metadata blob."""
        blob = encode_metadata(meta)
        header = torch.tensor([MAGIC, SCHEMA_VERSION, meta.version, len(blob)], dtype=torch.int64)
        self._wait(self._bcast(header.to(self.device)), "metadata", where)
        self._wait(
            self._bcast(torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(self.device)),
            "metadata",
            where,
        )

    def _send_buckets(self, meta: SyncMetadata, stream: Iterator, where: str) -> None:
        """One bucket on the wire while the next is pulled and packed. Of the iterator's tensors this
        holds at most two buckets' worth plus the largest tensor: a packed bucket is a copy (its tensors
        are dropped once copied), a bucket of one tensor is sent from the tensor itself; two such in a
        row that would pass the bound wait for the first before pulling the second."""
        n_buckets = len(meta.bucket_nbytes)
        bound = 2 * self.bucket_bytes + max((p.nbytes for p in meta.params), default=0)
        in_flight = None  # (work, stage, bytes of the iterator's tensors it holds)
        for b, (size, members) in enumerate(zip(meta.bucket_nbytes, meta.slots_by_bucket())):
            if in_flight is not None and in_flight[2] + size > bound:
                self._wait(*in_flight[:2], where)
                in_flight = buf = work = None  # the work and its buffer hold the tensor
            buf = self._pack(members, size, stream, b % 2)
            work = self._bcast(buf) if size else None
            if in_flight is not None:
                self._wait(*in_flight[:2], where)
            held = size if len(members) == 1 else 0  # sent from the tensor itself (no staging copy)
            in_flight = (work, f"bucket {b + 1}/{n_buckets}", held) if work is not None else None
        if in_flight is not None:
            self._wait(*in_flight[:2], where)

    def _pack(self, members: list[ParamSlot], size: int, stream: Iterator, staging: int) -> torch.Tensor:
        """Bucket bytes: the parameter itself for a bucket of one, else a copy into staging buffer
        ``staging`` (two alternate: the one being filled was last used two buckets ago, already waited)."""
        tensors = []
        for slot in members:
            item = next(stream, None)
            if item is None:
                raise SyncError(
                    f"weight sync: the tensor iterator ended before {slot.name!r} (spec says more)"
                )
            name, t = item
            if name != slot.name or dtype_name(t.dtype) != slot.dtype or tuple(t.shape) != slot.shape:
                raise SyncError(
                    f"weight sync: got {name!r} {t.dtype} {tuple(t.shape)} where the spec says "
                    f"{slot.name!r} {slot.dtype} {slot.shape}: spec and iterator must list the same tensors in order"
                )
            tensors.append(t.detach())
        if len(tensors) == 1 and tensors[0].device == self.device and tensors[0].is_contiguous():
            return as_bytes(tensors[0])  # no packing copy for a bucket of one
        if size > self.bucket_bytes:  # one parameter larger than a bucket: its own (copied) buffer
            return as_bytes(tensors[0].to(self.device))
        if not self._staging:  # reused across buckets and sends: fresh CPU buffers cost page faults
            self._staging = [
                torch.zeros(self.bucket_bytes, dtype=torch.uint8, device=self.device) for _ in range(2)
            ]
        buf = self._staging[staging][:size]
        for p, t in zip(members, tensors):
            buf[p.offset : p.offset + p.nbytes].copy_(as_bytes(t))
        return buf

    def close(self) -> None:
        self._drop_channel()
        self.store = None
        self._staging = []
        self.broken = self.broken or "closed"
