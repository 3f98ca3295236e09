"""What a weight-sync update looks like on the wire, as pure functions and plain data (no
torch.distributed): the metadata, the bucket plan, the group info a receiver joins with and the stats
of one update.

Protocol of one update (``SCHEMA_VERSION`` 1), all broadcasts from rank 0:

1. header: int64[4] = (``MAGIC``, schema, policy version, metadata length in bytes);
2. metadata: a msgpack blob as a uint8 tensor: ``{"schema", "version", "buckets": [bytes per
   bucket], "params": [[name, dtype, shape, bucket, offset], ...]}`` in send order;
3. buckets: one flat uint8 tensor per bucket packing consecutive parameters at ``ALIGN``-byte
   offsets. Packing happens on the sender's device into two alternating staging buffers (bucket k+1
   is packed while bucket k is on the wire); the receiver allocates a fresh buffer per bucket
   and yields dtype/shape views into it (no copy), so a consumer that applies weights as they come
   never holds more than ~two buckets beyond the model itself (bucket k+1 is already in flight while
   bucket k is consumed). A bucket with a single parameter is that parameter's own bytes (no packing
   copy); a parameter larger than ``bucket_mb`` travels alone in a bucket of its own size (the one
   deviation from "buckets ≤ bucket_mb": splitting it would force a copy on both sides).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import msgpack
import torch

from common.errors import SyncError, WireError

SCHEMA_VERSION = 1
MAGIC = 0x5452_4545_5753_0001  # "TREEWS" + 1: a header that is not ours fails before any allocation
ALIGN = 64  # byte alignment of every parameter inside a bucket (any dtype view is legal; GPU-friendly)
MAX_METADATA_BYTES = 64 << 20

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
for _name in ("float8_e4m3fn", "float8_e5m2"):  # quantized checkpoints; absent on old torch builds
    if hasattr(torch, _name):
        DTYPES[_name] = getattr(torch, _name)
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# --------------------------------------------------------------------------- metadata (pure)


@dataclass(frozen=True)
class ParamSlot:
    """Where one parameter lives in the stream: bucket index and byte offset inside that bucket."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    bucket: int
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class SyncMetadata:
    """The validated description of one update: policy version, parameters in send order, bucket sizes."""

    version: int
    params: tuple[ParamSlot, ...]
    bucket_nbytes: tuple[int, ...]

    @property
    def total_bytes(self) -> int:
        return sum(self.bucket_nbytes)

    def slots_by_bucket(self) -> list[list[ParamSlot]]:
        """The parameters of each bucket, in send order (validated metadata lists buckets in order)."""
        by_bucket: list[list[ParamSlot]] = [[] for _ in self.bucket_nbytes]
        for p in self.params:
            by_bucket[p.bucket].append(p)
        return by_bucket


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise SyncError(f"weight sync cannot carry dtype {dtype}; supported: {sorted(DTYPES)}") from None


def plan_buckets(
    specs: Iterable[tuple[str, torch.dtype | str, Sequence[int]]], bucket_bytes: int, version: int
) -> SyncMetadata:
    """Assign (name, dtype, shape) in order to buckets of at most ``bucket_bytes`` (a larger parameter
    gets a bucket of its own); offsets are ``ALIGN``-aligned."""
    if bucket_bytes <= 0:
        raise SyncError(f"sync.bucket_mb must be > 0 (got {bucket_bytes} bytes)")
    slots: list[ParamSlot] = []
    sizes: list[int] = []
    cur = 0  # bytes used in the open bucket; the open bucket is index len(sizes)
    n_open = 0  # parameters in the open bucket
    for name, dtype, shape in specs:
        dname = dtype if isinstance(dtype, str) else dtype_name(dtype)
        shape = tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * DTYPES[dname].itemsize
        if nbytes > bucket_bytes:  # alone, in a bucket of its own size
            if n_open:
                sizes.append(cur)
                cur, n_open = 0, 0
            slots.append(ParamSlot(name, dname, shape, len(sizes), 0))
            sizes.append(nbytes)
            continue
        off = -(-cur // ALIGN) * ALIGN
        if n_open and off + nbytes > bucket_bytes:
            sizes.append(cur)
            cur, n_open, off = 0, 0, 0
        slots.append(ParamSlot(name, dname, shape, len(sizes), off))
        cur, n_open = off + nbytes, n_open + 1
    if n_open:
        sizes.append(cur)
    meta = SyncMetadata(int(version), tuple(slots), tuple(sizes))
    validate_metadata(meta)
    return meta


def encode_metadata(meta: SyncMetadata) -> bytes:
    return msgpack.packb(
        {
            "schema": SCHEMA_VERSION,
            "version": meta.version,
            "buckets": list(meta.bucket_nbytes),
            "params": [[p.name, p.dtype, list(p.shape), p.bucket, p.offset] for p in meta.params],
        },
        use_bin_type=True,
    )


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def decode_metadata(blob: bytes) -> SyncMetadata:
    """Parse and validate a metadata blob; raises :class:`WireError` naming the first problem."""
    try:
        obj = msgpack.unpackb(blob, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as e:  # msgpack raises several types (ExtraData, ValueError, UnpackValueError, ...)
        raise WireError(f"weight-sync metadata is not valid msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise WireError(f"weight-sync metadata must be a map, got {type(obj).__name__}")
    missing = {"schema", "version", "buckets", "params"} - set(obj)
    if missing:
        raise WireError(f"weight-sync metadata lacks {sorted(missing)}")
    if obj["schema"] != SCHEMA_VERSION:
        raise WireError(
            f"weight-sync metadata has schema {obj['schema']!r}, this build reads {SCHEMA_VERSION}: "
            "run the same treepo version on the learner and the generators"
        )
    if not _is_int(obj["version"]) or obj["version"] < 0:
        raise WireError(f"weight-sync metadata: version must be an int >= 0, got {obj['version']!r}")
    buckets, params = obj["buckets"], obj["params"]
    if not isinstance(buckets, list) or not all(_is_int(b) and b >= 0 for b in buckets):
        raise WireError("weight-sync metadata: 'buckets' must be a list of byte counts >= 0")
    if not isinstance(params, list) or not params:
        raise WireError("weight-sync metadata: 'params' must be a non-empty list")
    slots = []
    for i, p in enumerate(params):
        if not (isinstance(p, list) and len(p) == 5):
            raise WireError(f"weight-sync metadata: param #{i} must be [name, dtype, shape, bucket, offset]")
        name, dtype, shape, bucket, offset = p
        if not isinstance(name, str) or not name:
            raise WireError(f"weight-sync metadata: param #{i} has no name")
        if dtype not in DTYPES:
            raise WireError(f"weight-sync metadata: {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise WireError(f"weight-sync metadata: {name!r} has a bad shape {shape!r}")
        if not (_is_int(bucket) and _is_int(offset)):
            raise WireError(f"weight-sync metadata: {name!r} has a non-integer bucket/offset")
        slots.append(ParamSlot(name, dtype, tuple(shape), bucket, offset))
    meta = SyncMetadata(obj["version"], tuple(slots), tuple(buckets))
    validate_metadata(meta)
    return meta


def validate_metadata(meta: SyncMetadata) -> None:
    """Names unique, every slot inside its bucket, aligned for its dtype, no overlaps, buckets used
    in order and every bucket's size equal to the end of its last parameter."""
    seen: set[str] = set()
    ends = [0] * len(meta.bucket_nbytes)
    last_bucket = 0
    for p in meta.params:
        if p.name in seen:
            raise WireError(f"weight-sync metadata: parameter {p.name!r} appears twice")
        seen.add(p.name)
        if not 0 <= p.bucket < len(meta.bucket_nbytes):
            raise WireError(
                f"weight-sync metadata: {p.name!r} is in bucket {p.bucket} of {len(meta.bucket_nbytes)}"
            )
        if p.bucket < last_bucket:  # receivers yield bucket by bucket: send order must be bucket order
            raise WireError(
                f"weight-sync metadata: {p.name!r} goes back to bucket {p.bucket} after {last_bucket}"
            )
        last_bucket = p.bucket
        if p.offset < ends[p.bucket] or p.offset % DTYPES[p.dtype].itemsize:
            raise WireError(f"weight-sync metadata: {p.name!r} overlaps or is misaligned (offset {p.offset})")
        end = p.offset + p.nbytes
        if end > meta.bucket_nbytes[p.bucket]:
            raise WireError(
                f"weight-sync metadata: {p.name!r} ends at byte {end}, past bucket {p.bucket} "
                f"({meta.bucket_nbytes[p.bucket]} bytes)"
            )
        ends[p.bucket] = max(end, ends[p.bucket])
    for b, (end, size) in enumerate(zip(ends, meta.bucket_nbytes)):
        if end != size:
            raise WireError(
                f"weight-sync metadata: bucket {b} is {size} bytes but its parameters end at {end}"
            )


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor (a view when it is contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


# --------------------------------------------------------------------------- group info and stats


@dataclass(frozen=True)
class SyncGroupInfo:
    """What a receiver needs to join the current group (plus its own rank). Plain data: send it through Ray."""

    host: str
    port: int
    world_size: int
    generation: int
    backend: str
    token: str = field(default="", repr=False)  # the generation's secret ('' = an unsecured group)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SyncStats:
    """One update as seen by one rank. ``gbps`` = payload bytes / seconds / 1e9."""

    version: int
    bytes: int
    params: int
    buckets: int
    seconds: float
    gbps: float
    receivers: int

    @classmethod
    def of(cls, meta: SyncMetadata, seconds: float, receivers: int) -> SyncStats:
        """The stats of the update ``meta`` that took ``seconds`` on a group of ``receivers``."""
        return cls(
            meta.version,
            meta.total_bytes,
            len(meta.params),
            len(meta.bucket_nbytes),
            seconds,
            meta.total_bytes / max(seconds, 1e-9) / 1e9,
            receivers,
        )

    def as_metrics(self) -> dict[str, float]:
        return {
            "sync/bytes": float(self.bytes),
            "sync/seconds": self.seconds,
            "sync/gbps": self.gbps,
            "sync/buckets": float(self.buckets),
        }
