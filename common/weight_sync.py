"""Weight-sync transport: a versioned, bucketed broadcast from learner rank 0 to every generator
engine worker over a process group created for the purpose (never the default torch.distributed
group), gloo on CPU and NCCL on GPU through one code path.

Group. Rank 0 (:class:`WeightSender`, on learner rank 0) is the master of a ``TCPStore`` on
(host, port); receivers (:class:`WeightReceiver`, ranks 1..N, one per engine worker) are its
clients. Every key of generation ``g`` lives under the prefix ``treepo-wsync-g<g>``, except
``treepo-wsync-current``, where the sender publishes the group it serves (generation, world size,
backend) so a receiver holding stale connection details fails at once with a clear message instead
of waiting. Each receiver claims its rank with an atomic ``add`` (two receivers claiming one rank
fail loudly); the sender waits for every claim, with the timeout, naming the ranks that never came;
then all ranks build ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` directly on the prefixed store.
Connecting is lazy (first :meth:`WeightSender.send` / :meth:`WeightReceiver.receive`) or explicit
(``connect()``), and must run concurrently on every rank.

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

Every wait has a timeout (store waits, ``Work.wait(timeout)`` on every collective; gloo's own
operation timeout is the same value). A failure or timeout raises :class:`SyncError` naming the
stage (metadata or bucket k/B) and marks the group dead: NCCL has no recovery and a gloo group whose
ranks disagree on the op sequence cannot be resumed. The fix is always the same: rebuild.

Join / rebuild protocol (the controller drives it; this module implements the group side). Whenever
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

The receiver is plain functions over a process group plus metadata (no vLLM import): in a CPU test
it runs in the generator's process and its iterator goes to the backend's ``update_weights``; on GPU
with multiprocess engines it runs inside each engine worker (a worker extension method calls
``receive()`` and hands the iterator to ``reload_weights(weights_iterator=..., is_checkpoint_format=True)``).

Access. A ``TCPStore`` has no authentication and listens on every interface, so whoever reaches its
port could claim a receiver's rank, read the gloo/NCCL rendezvous keys and join the group (and get
the weights). A secured sender (:meth:`WeightSender.from_config`, which the pipeline uses; or
``token=...``) draws a fresh random token for every generation and keeps every key of the group
(rank claims, the backend's rendezvous) under ``treepo-wsync-g<g>-<token>``: the store offers no way
to list keys, so without the token nothing of the group can be read, claimed or joined; a receiver
with a wrong or no token never joins (the sender's wait names the missing ranks) and cannot take a
legitimate receiver's rank. The token travels in :class:`SyncGroupInfo` through Ray calls (which Ray's
token authentication protects) and never into a repr. What is left: the store still accepts
connections, so an outsider can overwrite the public ``treepo-wsync-current`` record or flood the
port (denial of service, which the timeouts turn into a SyncError and a rebuild), and the
point-to-point gloo/NCCL connections after the rendezvous are not authenticated: keep these ports
inside the cluster's security group (the cluster YAMLs do).

NCCL: the same code with ``backend="nccl"``, CUDA tensors on ``torch.cuda.current_device()``,
``ProcessGroupNCCL`` with its ``_timeout`` option and ``Work.wait(timeout)`` (which blocks the CPU
until completion or the timeout). It cannot run on the CPU-only machines this is tested on.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import hashlib
import math
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import msgpack
import torch

from common.errors import SyncError, WireError

SCHEMA_VERSION = 1
MAGIC = 0x5452_4545_5753_0001  # "TREEWS" + 1: a header that is not ours fails before any allocation
ALIGN = 64  # byte alignment of every parameter inside a bucket (any dtype view is legal; GPU-friendly)
MAX_METADATA_BYTES = 64 << 20
CURRENT_KEY = "treepo-wsync-current"

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


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor (a view when it is contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


# --------------------------------------------------------------------------- group plumbing


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

    def as_metrics(self) -> dict[str, float]:
        return {
            "sync/bytes": float(self.bytes),
            "sync/seconds": self.seconds,
            "sync/gbps": self.gbps,
            "sync/buckets": float(self.buckets),
        }


def resolve_backend(backend: str) -> str:
    """``auto`` → nccl where CUDA is available, else gloo."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise SyncError(f"sync.backend must be 'auto', 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise SyncError(
            "sync.backend=nccl needs CUDA on this process; use sync.backend=gloo (or auto) on CPU"
        )
    return backend


def _device_for(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _prefix(generation: int, token: str = "") -> str:
    return f"treepo-wsync-g{generation}-{token}" if token else f"treepo-wsync-g{generation}"


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest() if token else ""


def new_token() -> str:
    """A generation's secret: 128 random bits."""
    return secrets.token_hex(16)


def _new_backend_pg(store, rank: int, world_size: int, backend: str, timeout: datetime.timedelta):
    if backend == "nccl":
        from torch.distributed import ProcessGroupNCCL

        opts = ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return ProcessGroupNCCL(store, rank, world_size, opts)
    from torch.distributed import ProcessGroupGloo

    return ProcessGroupGloo(store, rank, world_size, timeout)


def _drop_in_background(pg) -> None:
    """Release a dead group off the caller's thread: a gloo group's destructor waits for its pending
    ops (each bounded by the group timeout), NCCL's is aborted first."""
    if pg is None:
        return
    abort = getattr(pg, "abort", None)
    if callable(abort):
        with contextlib.suppress(Exception):  # a group already torn down has nothing left to abort
            abort()
    threading.Thread(target=lambda _pg: None, args=(pg,), daemon=True, name="treepo-wsync-drop").start()


class _Peer(abc.ABC):
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
        self.pg = None
        self.device = torch.device("cpu")
        self.broken: str = ""

    def _check_usable(self) -> None:
        if self.broken:
            raise SyncError(
                f"this weight-sync group is dead ({self.broken}); rebuild it on a new port and rejoin"
            )

    def _bcast(self, tensor: torch.Tensor):
        from torch.distributed import BroadcastOptions

        opts = BroadcastOptions()
        opts.rootRank = 0
        opts.timeout = self.timeout
        return self.pg.broadcast([tensor], opts)

    def _wait(self, work, stage: str, where: str) -> None:
        try:
            work.wait(self.timeout)
        except Exception as e:  # gloo/NCCL raise RuntimeError subclasses (DistError, ...) with the cause text
            raise self._fail(stage, where, e) from e

    def _fail(self, stage: str, where: str, e: BaseException) -> SyncError:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        timed_out = "timed out" in text.lower() or "timeout" in text.lower()
        what = (
            f"timed out after {self.timeout_s:g} s" if timed_out else f"failed ({type(e).__name__}: {text})"
        )
        self.broken = f"{stage} {what}"
        pg, self.pg = self.pg, None
        _drop_in_background(pg)
        return SyncError(
            f"{where} {what} at {stage}; the group is dead: rebuild it on a new port "
            "(WeightSender.rebuild) and rejoin every receiver (WeightReceiver.rejoin)"
        )

    def barrier(self) -> None:
        """Returns once every rank of the group reached it (a one-element all-reduce: a broadcast's root
        may finish before its receivers do; timeout applies). For benchmarks and controllers that need
        "every receiver has the update"."""
        from torch.distributed import AllreduceOptions

        self._check_usable()
        self._ensure_connected()
        opts = AllreduceOptions()
        opts.timeout = self.timeout
        work = self.pg.allreduce([torch.zeros(1, device=self.device)], opts)
        self._wait(work, "barrier", self._where())

    @abc.abstractmethod
    def _where(self) -> str:
        """Who waits on whom, for error messages."""

    @abc.abstractmethod
    def _ensure_connected(self) -> None:
        """Join the group if not joined yet."""


# --------------------------------------------------------------------------- sender


class WeightSender(_Peer):
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
    def from_config(cls, cfg, host: str, port: int, world_size: int, generation: int = 0) -> WeightSender:
        """From a :class:`common.config.SyncConfig`; secured (a random token per generation)."""
        return cls(host, port, world_size, cfg.backend, cfg.timeout_s, cfg.bucket_mb, generation, token=None)

    def _open_store(self, port: int) -> None:
        from torch.distributed import TCPStore

        try:
            self.store = TCPStore(
                host_name=self.host,
                port=int(port),
                world_size=None,
                is_master=True,
                timeout=self.timeout,
                wait_for_workers=False,
            )
        except Exception as e:  # DistNetworkError: address in use, bad host
            raise SyncError(
                f"cannot open the weight-sync store on {self.host}:{port} ({type(e).__name__}: {e}); "
                "pick another port (0 = any free port)"
            ) from e
        self.port = int(self.store.port)
        self.store.set(
            CURRENT_KEY,
            msgpack.packb(
                {
                    "schema": SCHEMA_VERSION,
                    "generation": self.generation,
                    "world_size": self.world_size,
                    "backend": self.backend,
                    # lets a receiver with a wrong token fail at once; the hash reveals nothing of it
                    "token_sha256": _token_hash(self.token),
                }
            ),
        )

    @property
    def info(self) -> SyncGroupInfo:
        return SyncGroupInfo(self.host, self.port, self.world_size, self.generation, self.backend, self.token)

    def _where(self) -> str:
        return (
            f"weight sync to {self.world_size - 1} receivers (generation {self.generation}, "
            f"{self.host}:{self.port})"
        )

    def connect(self) -> None:
        """Wait (≤ timeout_s) until every receiver claimed its rank, then build the group."""
        self._check_usable()
        self._ensure_connected()

    def _ensure_connected(self) -> None:
        if self.pg is not None:
            return
        from torch.distributed import PrefixStore

        store = PrefixStore(_prefix(self.generation, self.token), self.store)
        keys = [f"rank-{r}" for r in range(1, self.world_size)]
        t0 = time.monotonic()
        try:
            store.wait(keys, self.timeout)
        except Exception as e:  # DistStoreError on timeout
            missing = [r for r, k in enumerate(keys, start=1) if not store.check([k])]
            self.broken = f"receivers {missing} never joined"
            raise SyncError(
                f"{self._where()} timed out after {time.monotonic() - t0:.1f} s waiting for receiver ranks "
                f"{missing} to join; check that those generators got this group's info, or rebuild the "
                f"group with the current membership ({type(e).__name__})"
            ) from e
        try:
            self.pg = _new_backend_pg(store, 0, self.world_size, self.backend, self.timeout)
        except Exception as e:
            raise self._fail("connect", self._where(), e) from e
        self.device = _device_for(self.backend)

    def rebuild(self, port: int = 0, world_size: int | None = None) -> SyncGroupInfo:
        """Drop the current group and store, open generation+1 on ``port`` (0 = any free port) with
        ``world_size`` (default: unchanged). Give the returned info to every receiver."""
        _drop_in_background(self.pg)
        self.pg = None
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
        shape), tensors are pulled one bucket at a time and checked against it.
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
        blob = encode_metadata(meta)
        header = torch.tensor([MAGIC, SCHEMA_VERSION, meta.version, len(blob)], dtype=torch.int64)
        self._wait(self._bcast(header.to(self.device)), "metadata", where)
        self._wait(
            self._bcast(torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(self.device)),
            "metadata",
            where,
        )

        try:
            self._send_buckets(meta, stream, where)
        except Exception as e:
            if self.broken:  # a failed or timed-out wait: already a SyncError naming the stage
                raise
            # the iterator raised or broke its spec: the receivers are mid-update and cannot resync, so
            # drop the group now (they fail fast on the closed connection instead of timing out)
            self.broken = f"sender aborted mid-update ({type(e).__name__})"
            pg, self.pg = self.pg, None
            _drop_in_background(pg)
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
        seconds = time.perf_counter() - t0
        return SyncStats(
            meta.version,
            meta.total_bytes,
            len(meta.params),
            len(meta.bucket_nbytes),
            seconds,
            meta.total_bytes / max(seconds, 1e-9) / 1e9,
            self.world_size - 1,
        )

    def _send_buckets(self, meta: SyncMetadata, stream: Iterator, where: str) -> None:
        n_buckets = len(meta.bucket_nbytes)
        in_flight = None  # (work, stage): one bucket on the wire while the next is packed
        slots = iter(meta.params)
        pending_slot = next(slots, None)
        for b, size in enumerate(meta.bucket_nbytes):
            members = []
            while pending_slot is not None and pending_slot.bucket == b:
                members.append(pending_slot)
                pending_slot = next(slots, None)
            buf = self._pack(members, size, stream, b % 2)
            work = self._bcast(buf) if size else None
            if in_flight is not None:
                self._wait(*in_flight, where)
            in_flight = (work, f"bucket {b + 1}/{n_buckets}") if work is not None else None
        if in_flight is not None:
            self._wait(*in_flight, where)

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
            return _as_bytes(tensors[0])  # no packing copy for a bucket of one
        if size > self.bucket_bytes:  # one parameter larger than a bucket: its own (copied) buffer
            return _as_bytes(tensors[0].to(self.device))
        if not self._staging:  # reused across buckets and sends: fresh CPU buffers cost page faults
            self._staging = [
                torch.zeros(self.bucket_bytes, dtype=torch.uint8, device=self.device) for _ in range(2)
            ]
        buf = self._staging[staging][:size]
        for p, t in zip(members, tensors):
            buf[p.offset : p.offset + p.nbytes].copy_(_as_bytes(t))
        return buf

    def close(self) -> None:
        _drop_in_background(self.pg)
        self.pg = None
        self.store = None
        self._staging = []
        self.broken = self.broken or "closed"


# --------------------------------------------------------------------------- receiver


class WeightReceiver(_Peer):
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

    def connect(self) -> None:
        """Reach the store, check the group is the one we were told about, claim our rank, build the group."""
        self._check_usable()
        self._ensure_connected()

    def _ensure_connected(self) -> None:
        if self.pg is not None:
            return
        from torch.distributed import PrefixStore, TCPStore

        where = self._where()
        try:
            self.store = TCPStore(
                host_name=self.host, port=self.port, world_size=None, is_master=False, timeout=self.timeout
            )
            current = msgpack.unpackb(self.store.get(CURRENT_KEY), raw=False)
        except Exception as e:  # DistNetworkError / DistStoreError after the store timeout
            self.broken = "store unreachable"
            raise SyncError(
                f"{where} could not reach the weight-sync store within {self.timeout_s:g} s "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); is the learner's sender up "
                "on that host and port, and reachable from here?"
            ) from e
        expect = {"generation": self.generation, "world_size": self.world_size}
        got = {k: current.get(k) for k in expect}
        if got != expect or current.get("schema") != SCHEMA_VERSION:
            self.broken = "stale group info"
            raise SyncError(
                f"{where} was told generation {self.generation}, world size {self.world_size}, but the sender "
                f"now serves {current}: ask the controller for the current group info and rejoin"
            )
        if current.get("token_sha256", "") != _token_hash(self.token):
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
        store = PrefixStore(_prefix(self.generation, self.token), self.store)
        if store.add(f"rank-{self.rank}", 1) != 1:
            self.broken = "rank taken"
            raise SyncError(
                f"{where}: rank {self.rank} was already claimed in this generation; ranks must be unique"
            )
        try:
            self.pg = _new_backend_pg(store, self.rank, self.world_size, self.backend, self.timeout)
        except Exception as e:
            raise self._fail("connect", where, e) from e
        self.device = _device_for(self.backend)

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
        where = self._where()
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
        self._open_iter = True
        return meta.version, self._iter_buckets(meta, t0)

    def _iter_buckets(self, meta: SyncMetadata, t0: float) -> Iterator[tuple[str, torch.Tensor]]:
        where = self._where()
        n = len(meta.bucket_nbytes)
        by_bucket: list[list[ParamSlot]] = [[] for _ in range(n)]
        for p in meta.params:
            by_bucket[p.bucket].append(p)

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
            seconds = time.perf_counter() - t0
            self.last_stats = SyncStats(
                meta.version,
                meta.total_bytes,
                len(meta.params),
                n,
                seconds,
                meta.total_bytes / max(seconds, 1e-9) / 1e9,
                self.world_size - 1,
            )
        finally:
            self._open_iter = False
            if not done and not self.broken:  # consumer stopped early: posted broadcasts are out of step
                self.broken = "update abandoned mid-stream"
                pg, self.pg = self.pg, None
                _drop_in_background(pg)

    def close(self) -> None:
        _drop_in_background(self.pg)
        self.pg = None
        self.store = None
        self.broken = self.broken or "closed"
