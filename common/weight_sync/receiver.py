"""One receiver rank of the weight-sync group (ranks 1..N, one per generator engine worker): joins the
group the controller names, checks it is the group it was told about, and receives updates bucket by
bucket (:mod:`common.weight_sync.wire` says what comes in).

The receiver is plain functions over a transport's channel plus metadata (no vLLM import): in a CPU
test it runs in the generator's process and its iterator goes to the backend's ``update_weights``; on
GPU with multiprocess engines it runs inside each engine worker (a worker extension method calls
``receive()`` and hands the iterator to ``reload_weights(weights_iterator=..., is_checkpoint_format=True)``).
After a rebuild each receiver calls :meth:`WeightReceiver.rejoin` (or builds a new receiver with
:meth:`WeightReceiver.from_info`) with the new info and its rank (``offset of its engine + worker rank
inside the engine``); old members re-apply the version they have (idempotent).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import torch

from common.errors import SyncError, WireError
from common.weight_sync.peer import GroupPeer
from common.weight_sync.store import claim_rank, group_store, reach_store, token_hash
from common.weight_sync.transport import Channel, transport_for
from common.weight_sync.wire import (
    DTYPES,
    MAGIC,
    MAX_METADATA_BYTES,
    SCHEMA_VERSION,
    SyncGroupInfo,
    SyncMetadata,
    SyncStats,
    decode_metadata,
)


def _injected_death() -> None:
    """Failure injection for tests, one shot: when the file ``<TREEPO_FAULT_DIR>/sync_die_after_claim``
    exists it is removed and this process is SIGKILLed (a receiver dying after it claimed its rank,
    before the group is built); nothing in normal runs."""
    root = os.environ.get("TREEPO_FAULT_DIR")
    if not root:
        return
    try:
        os.unlink(os.path.join(root, "sync_die_after_claim"))
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


class WeightReceiver(GroupPeer):
    """One receiver rank (1..world_size-1), on one generator engine worker.

    :meth:`receive` returns ``(version, iterator of (name, tensor))``; the iterator receives bucket by
    bucket and must be consumed to the end before the next ``receive`` (the stream is positional).
    Tensors are views into a fresh per-bucket buffer (on CPU for gloo, on the current CUDA device for
    NCCL), valid after later buckets arrive.
    """

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        backend: str = "auto",
        timeout_s: float = 120.0,
        generation: int = 0,
        token: str = "",
    ) -> None:
        if rank == 0:
            raise SyncError("rank 0 is the sender (learner rank 0); receivers take ranks 1..world_size-1")
        super().__init__(rank, world_size, backend, timeout_s)
        self.host, self.port, self.generation = host, int(port), int(generation)
        self.token = token
        self.store = None
        self._open_iter = False
        self.last_stats: SyncStats | None = None

    @classmethod
    def from_info(cls, info: SyncGroupInfo | dict, rank: int, timeout_s: float = 120.0) -> WeightReceiver:
        if isinstance(info, dict):
            info = SyncGroupInfo(**info)
        return cls(
            info.host, info.port, rank, info.world_size, info.backend, timeout_s, info.generation, info.token
        )

    def rejoin(self, info: SyncGroupInfo | dict, rank: int, timeout_s: float | None = None) -> None:
        """Leave the current group and target ``info`` (connects on the next ``receive``/``connect``)."""
        if isinstance(info, dict):
            info = SyncGroupInfo(**info)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        self.close()
        WeightReceiver.__init__(
            self,
            info.host,
            info.port,
            rank,
            info.world_size,
            info.backend,
            timeout_s,
            info.generation,
            info.token,
        )

    def _where(self) -> str:
        return (
            f"weight-sync receiver rank {self.rank} (generation {self.generation}, {self.host}:{self.port})"
        )

    def _join(self) -> Channel:
        """Reach the store, check the group is the one we were told about, claim our rank, build the group."""
        where = self._where()
        try:
            self.store, current = reach_store(self.host, self.port, self.timeout)
        except Exception as e:  # DistNetworkError / DistStoreError after the store timeout
            self.broken = "store unreachable"
            raise SyncError(
                f"{where} could not reach the weight-sync store within {self.timeout_s:g} s "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); is the learner's sender up "
                "on that host and port, and reachable from here?"
            ) from e
        self._check_group(current, where)
        store = group_store(self.store, self.generation, self.token)
        if not claim_rank(store, self.rank):
            self.broken = "rank taken"
            raise SyncError(
                f"{where}: rank {self.rank} was already claimed in this generation; ranks must be unique"
            )
        _injected_death()
        try:
            return transport_for(self.backend).connect(store, self.rank, self.world_size, self.timeout)
        except Exception as e:
            raise self._fail("connect", where, e) from e

    def _check_group(self, current: dict, where: str) -> None:
        """The sender's public record against what we were told; takes its backend under ``auto``."""
        expect = {"generation": self.generation, "world_size": self.world_size}
        got = {k: current.get(k) for k in expect}
        if got != expect or current.get("schema") != SCHEMA_VERSION:
            self.broken = "stale group info"
            raise SyncError(
                f"{where} was told generation {self.generation}, world size {self.world_size}, but the sender "
                f"now serves {current}: ask the controller for the current group info and rejoin"
            )
        if current.get("token_sha256", "") != token_hash(self.token):
            self.broken = "wrong token"
            raise SyncError(
                f"{where} does not hold this group's token ({'none' if not self.token else 'a different one'}): "
                "join with the group info the controller hands out (WeightSender.info)"
            )
        if self.backend == "auto":
            self.backend = current["backend"]
        elif self.backend != current["backend"]:
            self.broken = "backend mismatch"
            raise SyncError(
                f"{where} uses backend {self.backend} but the sender uses {current['backend']}: set sync.backend alike"
            )

    def receive(self) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
        """Receive the metadata of the next update; returns its version and the bucket-by-bucket iterator."""
        self._check_usable()
        if self._open_iter:
            raise SyncError(
                f"{self._where()}: the previous update's iterator was not consumed to the end; the stream is out "
                "of step: rebuild the group"
            )
        t0 = time.perf_counter()
        self._ensure_connected()
        meta = self._receive_metadata(self._where())
        self._open_iter = True
        return meta.version, self._iter_buckets(meta, t0)

    def _receive_metadata(self, where: str) -> SyncMetadata:
        """The header, then the metadata blob it announces, checked against each other."""
        header = torch.zeros(4, dtype=torch.int64, device=self.device)
        self._wait(self._bcast(header), "metadata", where)
        magic, schema, version, length = (int(x) for x in header.cpu().tolist())
        if magic != MAGIC or schema != SCHEMA_VERSION or not 0 < length <= MAX_METADATA_BYTES:
            self.broken = "bad header"
            raise SyncError(
                f"{where} got a header that is not a treepo weight-sync header of schema {SCHEMA_VERSION} "
                f"(magic {magic:#x}, schema {schema}, metadata {length} bytes): sender and receiver must run the "
                "same treepo version; rebuild the group"
            )
        blob_t = torch.empty(length, dtype=torch.uint8, device=self.device)
        self._wait(self._bcast(blob_t), "metadata", where)
        try:
            meta = decode_metadata(blob_t.cpu().numpy().tobytes())
        except WireError as e:
            self.broken = "bad metadata"
            raise SyncError(f"{where} rejected the update's metadata: {e}; rebuild the group") from e
        if meta.version != version:
            self.broken = "bad metadata"
            raise SyncError(
                f"{where}: header says version {version}, metadata says {meta.version}; rebuild the group"
            )
        return meta

    def _iter_buckets(self, meta: SyncMetadata, t0: float) -> Iterator[tuple[str, torch.Tensor]]:
        where = self._where()
        n = len(meta.bucket_nbytes)
        by_bucket = meta.slots_by_bucket()

        def post(b: int):
            buf = torch.empty(meta.bucket_nbytes[b], dtype=torch.uint8, device=self.device)
            return (self._bcast(buf) if meta.bucket_nbytes[b] else None), buf

        done = False
        try:
            nxt = post(0)
            for b in range(n):
                work, buf = nxt
                if work is not None:
                    self._wait(work, f"bucket {b + 1}/{n}", where)
                if b + 1 < n:  # next bucket on the wire while the consumer applies this one
                    nxt = post(b + 1)
                for p in by_bucket[b]:
                    view = buf[p.offset : p.offset + p.nbytes].view(DTYPES[p.dtype]).view(p.shape)
                    yield p.name, view
            done = True
            self.last_stats = SyncStats.of(meta, time.perf_counter() - t0, self.world_size - 1)
        finally:
            self._open_iter = False
            if not done and not self.broken:  # consumer stopped early: posted broadcasts are out of step
                self.broken = "update abandoned mid-stream"
                self._drop_channel()

    def close(self) -> None:
        self._drop_channel()
        self.store = None
        self.broken = self.broken or "closed"
