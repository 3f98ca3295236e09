"""The durable replay queue: finished trees in a Redis stream read through a consumer group.

Keys of a run (:class:`common.keys.RunKeys`): the stream ``trees`` (entries ``{tree: <encode_tree
bytes>, schema: <version>}``), the dead-letter stream ``dead`` and the counter ``dead_count``;
consumers read in the group ``learners``.

Delivery contract: at-least-once into Redis, exactly-once into training relative to
checkpoints.

- Generators call :meth:`ReplayQueue.push`; an entry over ``max_entry_bytes`` is refused at the
  producer (:class:`WireError`), so a consumer never receives one it would reject for size. The
  client retries a command whose connection broke; if the reply of an XADD was lost that can add a
  tree twice (at-least-once), so consumers that must be exact dedupe by ``tree_id``.
- The learner side calls :meth:`read` for new entries (``XREADGROUP >``); they stay *pending* (delivered,
  unacknowledged) until the controller calls :meth:`ack` — only after the checkpoint containing their
  update is committed. On resume, :meth:`reclaim` re-delivers the pending entries: the consumer's own
  (``XREADGROUP 0``) and, after ``min_idle_ms``, those of consumers that died (``XAUTOCLAIM``).
- An entry that fails :func:`decode_tree` (or is too large, or has no payload) is moved to the
  dead-letter stream with the reason, its source id, its size and SHA-256 and the first
  ``dead_data_bytes`` (64 KiB) of its bytes, and acknowledged on the main stream in the same
  transaction, so it never blocks or comes back; :meth:`dead_count` counts them. The stream keeps
  the last ``dead_maxlen`` (1000) entries, trimmed exactly: at most ~64 MiB however large the poison
  entries were (full 8 MiB payloads would be 8 GB against the embedded server's 2 GB).
- :meth:`trim_acked` removes only entries below both the oldest pending id and the group's
  last-delivered id (``XTRIM MINID``): Redis 7.0's ``MAXLEN``/``XTRIM`` would delete unacknowledged
  entries otherwise. Memory is bounded by the generators' admission control, never by dropping data.

Every call has a socket timeout longer than its longest block; connection and authentication
failures raise :class:`QueueError` naming the server and what to check. No pickle: entries are the
msgpack wire format of :mod:`common.tree`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from common.errors import QueueError, WireError
from common.keys import RunKeys
from common.tree import SCHEMA_VERSION, Tree, decode_tree, encode_tree

if TYPE_CHECKING:  # common.config imports this module (check_url) when it validates queue.url
    from common.config import QueueConfig

GROUP = "learners"
DEAD_MAXLEN = 1000  # dead-letter entries kept (the counter dead_count counts them all)
DEAD_DATA_BYTES = 64 << 10  # bytes of a dead entry's payload kept (size and sha256 describe the rest)
FIELD_TREE = b"tree"
FIELD_SCHEMA = b"schema"
MiB = 1 << 20
_T = TypeVar("_T")


def stream_keys(run_name: str) -> dict[str, str]:
    """Redis keys used by the queue of ``run_name`` (spelled by :class:`common.keys.RunKeys`)."""
    k = RunKeys(run_name)
    return {"trees": k.trees, "dead": k.dead, "dead_count": k.dead_count}


def as_str(x: bytes | str) -> str:
    """A Redis reply value (bytes, or str on a decoding client) as text."""
    return x.decode() if isinstance(x, bytes) else str(x)


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _next_id(entry_id: str) -> str:
    """The smallest stream id greater than ``entry_id``."""
    ms, seq = _id_tuple(entry_id)
    return f"{ms}-{seq + 1}"


def _min_id(a: str, b: str) -> str:
    return a if _id_tuple(a) <= _id_tuple(b) else b


def connect(
    url: str,
    password: str | None = None,
    *,
    socket_timeout_s: float = 10.0,
    connect_timeout_s: float = 5.0,
    outage_s: float = 10.0,
) -> redis.Redis:
    """A binary-safe redis-py client for any ``redis://`` or ``rediss://`` (TLS) URL; checked with PING.

    After the first PING (which fails fast), a command whose connection broke is retried for about
    ``outage_s`` seconds (``queue.outage_s``): a server restart or a short outage is ridden out."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise QueueError(f"queue URL {describe(url)} must start with redis://, rediss:// (TLS) or unix://")
    check_url(url, key="the queue URL")
    kwargs: dict[str, Any] = dict(
        decode_responses=False,
        protocol=2,  # the reply shapes parsed here (redis-py >= 5 defaults differ)
        # Retries ride out a blip or a server restart (AOF replay of a large queue takes seconds);
        # a dead server still fails after about outage_s, with the URL in the message.
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries_for(outage_s)),
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        health_check_interval=30,
    )
    if password:
        kwargs["password"] = password
    client = redis.Redis.from_url(url, **kwargs)
    # The first PING fails fast: a wrong password or a dead server is not worth retrying.
    client.set_retry(Retry(NoBackoff(), 0))
    guarded(client, url, client.ping)
    client.set_retry(kwargs["retry"])
    return client


class SecretFile:
    """A secret handed to another process by reference: the path of a 0600 file, never its value.

    Why: Ray stores an actor's constructor arguments (and its runtime_env, env_vars included) in the
    GCS, where they outlive the actor and are served to every token holder's state/dashboard calls;
    a password passed that way is a copy that nobody cleans up. The driver writes the queue password
    into ``<run_dir>/secrets/queue_password`` (directory 0700, file 0600, owned by the run's user);
    the run directory is already on storage every node shares (learner checkpoints, the controller's
    reads), so a generator on any node reads it when it (re)starts. The driver removes it when the
    pipeline stops. ``repr`` shows the path only, so logs and error messages never hold the value.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)

    @classmethod
    def write(cls, run_dir: str | os.PathLike, value: str, name: str = "queue_password") -> SecretFile:
        folder = Path(run_dir) / "secrets"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        path = folder / name
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value)
        os.replace(tmp, path)
        return cls(path)

    def read(self) -> str:
        try:
            st = os.stat(self.path)
            with open(self.path) as f:
                value = f.read()
        except OSError as e:
            raise QueueError(
                f"cannot read the queue password file {self.path} ({e.strerror}): run_dir must be on a "
                "file system every Ray node shares (see docs/cluster.md, 'Where the model and the data go')"
            ) from None
        if st.st_mode & 0o077:
            raise QueueError(
                f"{self.path} is readable by other users (mode {st.st_mode & 0o777:o}): chmod 600 it"
            )
        return value

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __repr__(self) -> str:
        return f"SecretFile({self.path!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretFile) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)


def resolve_password(password: str | SecretFile | None) -> str | None:
    """A password given by value (in-process callers) or by :class:`SecretFile` (actors)."""
    return password.read() if isinstance(password, SecretFile) else password


def check_url(url: str, password_env: str = "TREEPO_REDIS_PASSWORD", key: str = "queue.url") -> None:
    """Refuse a queue URL that carries a password (``redis://user:pass@host``): it would be written
    to the run's config.yaml, logs and actor specs. A user name alone (``redis://treepo@host``) is
    not a secret and is allowed; the password comes from the environment variable ``password_env``."""
    if not url:
        return
    try:
        parts = urlsplit(url)
        has_password = parts.password is not None or "password" in parse_qs(parts.query)
    except ValueError:
        has_password = "@" in url
    if has_password:
        raise QueueError(
            f"{key} must not contain a password ({describe(url)}): remove it from the URL and export it "
            f"in {password_env} instead"
        )


def retries_for(outage_s: float) -> int:
    """Retries of the client's backoff (0.05 s doubling to a 2 s cap) that span about ``outage_s``."""
    waited, n = 0.0, 0
    while waited < outage_s:
        waited += min(2.0, 0.05 * 2**n)
        n += 1
    return max(n, 1)


def describe(url: str) -> str:
    """``host:port`` of a URL without its credentials (for messages)."""
    try:
        parts = urlsplit(url)
        return f"{parts.hostname}:{parts.port or 6379}"
    except ValueError:
        return "<unparsable url>"


def guarded(client: redis.Redis, url: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Call ``fn`` and turn redis-py's transport/auth errors into QueueError with a fix."""
    where = describe(url)
    try:
        return fn(*args, **kwargs)
    except redis.AuthenticationError as e:
        raise QueueError(
            f"Redis at {where} rejected the password ({e}): check the password (queue.password_env, "
            "or <run_dir>/redis/password for the embedded server)"
        ) from None
    except redis.TimeoutError as e:
        raise QueueError(
            f"Redis at {where} did not answer in time ({e}): check that the server is up and not "
            "stalled (huge entries, a slow disk with appendfsync always)"
        ) from None
    except redis.ConnectionError as e:
        raise QueueError(
            f"cannot reach Redis at {where} ({e}): check that the server is running, the host/port, "
            "TLS (rediss://) and firewalls"
        ) from None
    except redis.OutOfMemoryError as e:
        raise QueueError(
            f"Redis at {where} is full ({e}): raise queue.maxmemory_mb or lower algo.max_staleness "
            "(admission control bounds the queue; entries are never evicted)"
        ) from None
    except redis.ResponseError as e:
        if "NOAUTH" in str(e) or "WRONGPASS" in str(e):
            raise QueueError(
                f"Redis at {where} needs a valid password ({e}): set queue.password_env"
            ) from None
        if "NOGROUP" in str(e):
            raise QueueError(
                f"Redis at {where} has lost the queue's stream or consumer group ({e}): the server "
                "restarted without persistence (appendonly) or the keys were deleted"
            ) from None
        raise QueueError(f"Redis at {where} refused a queue command: {e}") from None


class ReplayQueue:
    """Producer and consumer sides of one run's replay queue (create one per process/actor)."""

    def __init__(
        self,
        url: str,
        run_name: str,
        *,
        password: str | None = None,
        max_entry_bytes: int = 8 * MiB,
        block_ms: int = 2000,
        socket_timeout_s: float | None = None,
        connect_timeout_s: float = 5.0,
        dead_maxlen: int = DEAD_MAXLEN,
        dead_data_bytes: int = DEAD_DATA_BYTES,
        client: redis.Redis | None = None,
        outage_s: float = 10.0,
    ) -> None:
        if max_entry_bytes <= 0 or block_ms < 0:
            raise QueueError("max_entry_bytes must be > 0 and block_ms >= 0")
        self.url = url
        self.run_name = run_name
        self.keys = stream_keys(run_name)
        self.max_entry_bytes = int(max_entry_bytes)
        self.block_ms = int(block_ms)
        if dead_maxlen < 1 or dead_data_bytes < 0:
            raise QueueError("dead_maxlen must be >= 1 and dead_data_bytes >= 0")
        self.dead_maxlen = int(dead_maxlen)
        self.dead_data_bytes = int(dead_data_bytes)
        # The socket timeout must outlast the longest BLOCK, or a quiet queue looks like a dead server.
        timeout = socket_timeout_s if socket_timeout_s is not None else block_ms / 1000 + 10.0
        if timeout * 1000 <= block_ms:
            raise QueueError(f"socket_timeout_s ({timeout}) must exceed block_ms ({block_ms}) / 1000")
        self._socket_timeout_s = timeout
        self.redis = client or connect(
            url, password, socket_timeout_s=timeout, connect_timeout_s=connect_timeout_s, outage_s=outage_s
        )
        # The consumer's run-level check of a decoded tree (common.tree.check_for_run): a tree it
        # rejects with WireError is quarantined like an undecodable one.
        self.check: Callable[[Tree], None] | None = None
        # Told (entry id, reason) of every entry moved to the dead-letter stream: the consumer counts
        # and reports them, whichever check refused them.
        self.on_dead_letter: Callable[[str, str], None] | None = None
        self._ensure_group()

    @classmethod
    def from_config(cls, cfg: QueueConfig, url: str, run_name: str, password: str | None) -> ReplayQueue:
        """Build from a :class:`common.config.QueueConfig` (``max_entry_mb``, ``block_ms``)."""
        return cls(
            url,
            run_name,
            password=password,
            max_entry_bytes=int(cfg.max_entry_mb * MiB),
            block_ms=int(cfg.block_ms),
            outage_s=float(getattr(cfg, "outage_s", 10.0)),
        )

    def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        return guarded(self.redis, self.url, fn, *args, **kwargs)

    def _ensure_group(self) -> None:
        # Created at id 0, not "$": trees pushed before any consumer exists must still be delivered.
        try:
            self._call(self.redis.xgroup_create, self.keys["trees"], GROUP, id="0", mkstream=True)
        except QueueError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def close(self) -> None:
        self.redis.close()

    # ------------------------------------------------------------------ producer
    def encode(self, tree: Tree) -> bytes:
        """Serialize ``tree`` and enforce the entry size limit (WireError names the sizes)."""
        data = encode_tree(tree)
        if len(data) > self.max_entry_bytes:
            raise WireError(
                f"tree {tree.tree_id}: {len(data) / MiB:.2f} MiB entry exceeds queue.max_entry_mb "
                f"({self.max_entry_bytes / MiB:.2f} MiB); lower tree.w / segment length or raise the limit"
            )
        return data

    def entry_fields(self, data: bytes) -> dict[bytes, bytes | int]:
        return {FIELD_TREE: data, FIELD_SCHEMA: SCHEMA_VERSION}

    def push(self, tree: Tree) -> str:
        """Append one tree; returns its entry id. Refuses oversize or invalid trees with WireError."""
        data = self.encode(tree)
        return as_str(self._call(self.redis.xadd, self.keys["trees"], self.entry_fields(data)))

    # ------------------------------------------------------------------ consumer
    def read(
        self, count: int, block_ms: int | None = None, consumer: str = "learner"
    ) -> list[tuple[str, Tree]]:
        """Up to ``count`` new entries for ``consumer`` (waits ≤ ``block_ms``, 0 = no wait).

        Entries that fail validation go to the dead-letter stream and are not returned, so the list
        can be shorter than what was delivered. Returned entries stay pending until :meth:`ack`.
        """
        block = self.block_ms if block_ms is None else int(block_ms)
        if block * 1000 >= self._socket_timeout_s * 1e6:
            raise QueueError(f"block_ms={block} exceeds the socket timeout of {self._socket_timeout_s} s")
        resp = self._call(
            self.redis.xreadgroup,
            GROUP,
            consumer,
            {self.keys["trees"]: ">"},
            count=count,
            block=block if block > 0 else None,
        )
        return self._decode_entries(self._entries_of(resp), consumer)

    @staticmethod
    def _entries_of(resp: Any) -> list[tuple[bytes, dict | None]]:
        return [e for _key, entries in resp or [] for e in entries]

    def _decode_entries(
        self, entries: Iterable[tuple[bytes, dict | None]], consumer: str
    ) -> list[tuple[str, Tree]]:
        out: list[tuple[str, Tree]] = []
        for raw_id, fields in entries:
            entry_id = as_str(raw_id)
            data = (fields or {}).get(FIELD_TREE)
            try:
                if fields is None:
                    raise WireError("entry was deleted from the stream while pending (data lost)")
                if data is None:
                    raise WireError(f"entry has no {FIELD_TREE.decode()!r} field (fields: {sorted(fields)})")
                tree = decode_tree(data, max_bytes=self.max_entry_bytes)
                if self.check is not None:
                    self.check(tree)
                out.append((entry_id, tree))
            except WireError as e:
                self._dead_letter(entry_id, str(e), data or b"", consumer)
        return out

    def quarantine(self, entry_id: str, reason: str, consumer: str = "learner") -> None:
        """Move one delivered entry to the dead-letter stream with ``reason`` (acknowledged on the main
        stream in the same transaction): a tree that decoded but failed later, e.g. in training."""
        rows = self._call(self.redis.xrange, self.keys["trees"], min=entry_id, max=entry_id)
        data = (rows[0][1] or {}).get(FIELD_TREE, b"") if rows else b""
        self._dead_letter(entry_id, reason, data, consumer)

    def entries(self, ids: Iterable[str], consumer: str) -> list[tuple[str, Tree]]:
        """The entries ``ids`` (delivered earlier, e.g. by a read whose reply was lost), decoded and
        checked like :meth:`read`'s; missing ones are dead-lettered as lost."""
        found: list[tuple[bytes, dict | None]] = []
        for entry_id in ids:
            rows = self._call(self.redis.xrange, self.keys["trees"], min=entry_id, max=entry_id)
            found.append((entry_id.encode(), rows[0][1] if rows else None))
        return self._decode_entries(found, consumer)

    def _dead_letter(self, entry_id: str, reason: str, data: bytes, consumer: str) -> None:
        # Bounded whatever the poison: the head of the payload (enough to see what it was), its size
        # and digest; exact trimming so the stream never holds more than dead_maxlen entries.
        kept = data[: self.dead_data_bytes]
        fields = {
            b"source_id": entry_id,
            b"reason": reason[:2000],
            b"consumer": consumer,
            b"data": kept,
            b"size": len(data),
            b"sha256": hashlib.sha256(data).hexdigest(),
            b"truncated": int(len(kept) < len(data)),
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.keys["dead"], fields, maxlen=self.dead_maxlen, approximate=False)
        pipe.xack(self.keys["trees"], GROUP, entry_id)
        pipe.incr(self.keys["dead_count"])
        self._call(pipe.execute)
        if self.on_dead_letter is not None:
            self.on_dead_letter(entry_id, reason)
        # the poison leaves the main stream now, not at the next checkpoint's trim (there may be none:
        # poison read after the last checkpoint stayed in the stream); trimming acknowledged entries
        # is safe at any time (never below the oldest pending or undelivered one)
        self.trim_acked()

    def ack(self, ids: Iterable[str]) -> int:
        """Acknowledge entries (call after the checkpoint containing their update is committed)."""
        ids = list(ids)
        if not ids:
            return 0
        n = 0
        for i in range(0, len(ids), 1000):
            n += int(self._call(self.redis.xack, self.keys["trees"], GROUP, *ids[i : i + 1000]))
        return n

    def pending(self, consumer: str | None = None) -> list[str]:
        """Ids delivered but not yet acknowledged (of one consumer, or all), oldest first."""
        out: list[str] = []
        start = "-"
        while True:
            rows = self._call(
                self.redis.xpending_range,
                self.keys["trees"],
                GROUP,
                min=start,
                max="+",
                count=1000,
                consumername=consumer,
            )
            out += [as_str(r["message_id"]) for r in rows]
            if len(rows) < 1000:
                return out
            start = "(" + out[-1]

    def reclaim(self, consumer: str, min_idle_ms: int = 0, count: int = 100) -> list[tuple[str, Tree]]:
        """Re-deliver pending entries to ``consumer`` on resume, oldest first.

        First the consumer's own pending entries (``XREADGROUP`` from id 0: same name after a
        restart), then every other consumer's entries idle for at least ``min_idle_ms``
        (``XAUTOCLAIM`` loop: a consumer that died under another name). Entries that no longer
        validate, or were deleted from the stream, are dead-lettered.
        """
        got: dict[str, Tree] = {}
        start = "0"
        while True:
            resp = self._call(
                self.redis.xreadgroup, GROUP, consumer, {self.keys["trees"]: start}, count=count
            )
            entries = self._entries_of(resp)
            if not entries:
                break
            got.update(self._decode_entries(entries, consumer))
            start = as_str(entries[-1][0])
        cursor = "0-0"
        while True:
            resp = self._call(
                self.redis.xautoclaim, self.keys["trees"], GROUP, consumer, min_idle_ms, cursor, count=count
            )
            cursor, entries = as_str(resp[0]), resp[1]
            # XAUTOCLAIM also returns our own entries again; entries deleted from the stream are
            # dropped from the pending list by Redis and listed in resp[2] (data lost: count them).
            entries = [e for e in entries if as_str(e[0]) not in got]
            got.update(self._decode_entries(entries, consumer))
            for lost in resp[2] if len(resp) > 2 else []:
                self._dead_letter(
                    as_str(lost), "entry was deleted from the stream while pending (data lost)", b"", consumer
                )
            if cursor == "0-0":
                break
        return sorted(got.items(), key=lambda kv: _id_tuple(kv[0]))

    # ------------------------------------------------------------------ housekeeping
    def _group_info(self) -> dict[str, Any]:
        for g in self._call(self.redis.xinfo_groups, self.keys["trees"]):
            if as_str(g["name"]) == GROUP:
                return g
        raise QueueError(f"consumer group {GROUP!r} missing on {self.keys['trees']}")

    def trim_acked(self) -> int:
        """Delete acknowledged entries; never an unacknowledged or undelivered one. Returns the count.

        The threshold is ``min(oldest pending id, next id after every group's last-delivered id)``:
        every entry below it has been delivered and acknowledged by every group.
        """
        key = self.keys["trees"]
        groups = self._call(self.redis.xinfo_groups, key)
        if not groups:
            return 0
        threshold: str | None = None
        for g in groups:
            bound = _next_id(as_str(g["last-delivered-id"]))
            summary = self._call(self.redis.xpending, key, as_str(g["name"]))
            if summary["pending"]:
                bound = _min_id(bound, as_str(summary["min"]))
            threshold = bound if threshold is None else _min_id(threshold, bound)
        return int(self._call(self.redis.xtrim, key, minid=threshold, approximate=False))

    def dead_count(self) -> int:
        """Entries moved to the dead-letter stream since the run began."""
        return int(self._call(self.redis.get, self.keys["dead_count"]) or 0)

    def dead_entries(self, count: int = 5) -> list[dict[str, Any]]:
        """The last ``count`` dead-letter entries (newest first): id, source id, reason, consumer,
        the original size in ``bytes`` and its ``sha256``, and ``data`` (its first
        ``dead_data_bytes``; ``truncated`` when that is not all of it)."""
        rows = self._call(self.redis.xrevrange, self.keys["dead"], count=count)
        out = []
        for rid, f in rows:
            data = f.get(b"data", b"")
            out.append(
                {
                    "id": as_str(rid),
                    "source_id": as_str(f.get(b"source_id", b"")),
                    "reason": as_str(f.get(b"reason", b"")),
                    "consumer": as_str(f.get(b"consumer", b"")),
                    "bytes": int(f.get(b"size", len(data))),
                    "sha256": as_str(f.get(b"sha256", b"")),
                    "truncated": f.get(b"truncated", b"0") == b"1",
                    "data": data,
                }
            )
        return out

    def undelivered(self) -> int:
        """Entries not yet delivered to the group."""
        g = self._group_info()
        if g.get("lag") is not None:
            return int(g["lag"])
        # lag is unknown after deletions in the middle of the stream: count ids past last-delivered.
        start, n = "(" + as_str(g["last-delivered-id"]), 0
        while True:
            rows = self._call(self.redis.xrange, self.keys["trees"], min=start, count=1000)
            n += len(rows)
            if len(rows) < 1000:
                return n
            start = "(" + as_str(rows[-1][0])

    def depth(self) -> int:
        """Entries not yet consumed for good: undelivered + delivered-but-unacknowledged."""
        summary = self._call(self.redis.xpending, self.keys["trees"], GROUP)
        return self.undelivered() + int(summary["pending"])

    def stats(self) -> dict[str, Any]:
        """Lengths, pending per consumer, oldest pending age, dead letters, server memory."""
        key = self.keys["trees"]
        summary = self._call(self.redis.xpending, key, GROUP)
        now_s, now_us = self._call(self.redis.time)
        now_ms = now_s * 1000 + now_us // 1000
        oldest_age_s = None
        if summary["pending"]:
            oldest_age_s = max(0.0, (now_ms - _id_tuple(as_str(summary["min"]))[0]) / 1000)
        mem = self._call(self.redis.info, "memory")
        undelivered = self.undelivered()
        return {
            "run": self.run_name,
            "stream": key,
            "length": int(self._call(self.redis.xlen, key)),
            "undelivered": undelivered,
            "pending": int(summary["pending"]),
            "depth": undelivered + int(summary["pending"]),
            "pending_per_consumer": {
                as_str(c["name"]): int(c["pending"]) for c in summary["consumers"] or []
            },
            "oldest_pending_age_s": oldest_age_s,
            "dead_length": int(self._call(self.redis.xlen, self.keys["dead"])),
            "dead_count": self.dead_count(),
            "used_memory_mb": round(mem.get("used_memory", 0) / MiB, 2),
            "maxmemory_mb": round(mem.get("maxmemory", 0) / MiB, 2),
            "checked_at": time.time(),
        }
