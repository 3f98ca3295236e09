"""Prompt dispatch through Redis: each prompt of each epoch goes to exactly one generator.

Rule. Epoch ``e`` visits the ``N`` prompts in the order ``perm_e = default_rng([seed, e]).permutation(N)``
(numpy's SeedSequence of ``(seed, e)``: deterministic, independent per epoch). Redis stores only
integers: a global cursor ``c`` over positions ``0 .. epochs*N-1`` (position ``q`` is prompt
``prompt_ids[perm_{q // N}[q % N]]`` of epoch ``q // N``), each generator's in-flight positions
with their claim time, and a retry list. Every process computes the same permutation, so the
mapping needs no shared state beyond the cursor.

- :meth:`PromptDispatcher.claim` (one Lua script, atomic): pops the retry list first, then advances
  the cursor, and records what it hands out as in flight for that generator.
- :meth:`done` (or :meth:`push_and_done`, which pushes the finished tree and clears the in-flight
  record in one script) ends a prompt's flight. ``push_and_done`` refuses (returns None) a tree whose
  prompt is no longer in flight for that generator — it was re-issued to another — so a generator
  thought dead cannot produce a duplicate.
- :meth:`requeue_generator` moves a dead generator's in-flight prompts to the retry list; a
  generator restarted under the same id calls it for itself first. :meth:`requeue_older_than` does
  the same for prompts in flight too long (a hung generator, or a claim whose reply was lost and
  retried by the client, which leaves prompts recorded that nobody works on).
- :meth:`reissue` puts the prompt of a tree the controller dropped for staleness back on the retry
  list, at most once per queue entry: the entry id is recorded with it in one script, so an entry
  re-delivered after a crash (it stays pending until the checkpoint that covers it) re-issues
  nothing again. :meth:`forget_reissued` drops the records of acknowledged entries.

State lives under the run's ``prompts:*`` keys (:class:`common.keys.RunKeys`) and persists with
Redis's AOF, so a resumed run continues where it stopped; :meth:`state` is a JSON-able snapshot for checkpoints. The dataset size,
seed and a digest of the prompt ids are recorded on first use; a later dispatcher with different
ones is refused (its positions would name other prompts). ``epochs`` may grow on resume.
"""

from __future__ import annotations

import hashlib
import time
from functools import lru_cache
from typing import Any

import numpy as np
import redis

from common.errors import QueueError
from common.keys import RunKeys
from common.replay import FIELD_SCHEMA, FIELD_TREE, ReplayQueue, as_str, guarded
from common.tree import SCHEMA_VERSION, Tree

_CLAIM = """
local want, total = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
while #out < want do
  local p = redis.call('LPOP', KEYS[2])
  if not p then break end
  out[#out + 1] = p
end
if #out < want then
  local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
  local take = math.min(want - #out, total - cur)
  if take > 0 then
    for i = 0, take - 1 do out[#out + 1] = tostring(cur + i) end
    redis.call('SET', KEYS[1], cur + take)
  end
end
for _, p in ipairs(out) do redis.call('HSET', KEYS[3], p, ARGV[3]) end
if #out > 0 then redis.call('SADD', KEYS[4], ARGV[4]) end
return out
"""

_REQUEUE = """
local ps = redis.call('HKEYS', KEYS[1])
table.sort(ps, function(a, b) return tonumber(a) < tonumber(b) end)
for _, p in ipairs(ps) do redis.call('RPUSH', KEYS[2], p) end
redis.call('DEL', KEYS[1])
return #ps
"""

_REQUEUE_SOME = """
local n = 0
for i = 1, #ARGV do
  if redis.call('HDEL', KEYS[1], ARGV[i]) == 1 then
    redis.call('RPUSH', KEYS[2], ARGV[i])
    n = n + 1
  end
end
return n
"""

_PUSH_DONE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  return redis.call('XADD', KEYS[2], '*', ARGV[3], ARGV[2], ARGV[5], ARGV[4])
end
return false
"""

_REISSUE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('INCR', KEYS[3])
return 1
"""

_META = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'n', ARGV[1], 'seed', ARGV[2], 'digest', ARGV[3], 'epochs', ARGV[4])
else
  redis.call('HSET', KEYS[1], 'epochs', ARGV[4])
end
return redis.call('HMGET', KEYS[1], 'n', 'seed', 'digest')
"""


@lru_cache(maxsize=8)
def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The visiting order of epoch ``epoch``: a permutation of ``range(n)`` (read-only)."""
    perm = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
    perm.setflags(write=False)
    return perm


@lru_cache(maxsize=8)
def _inverse(n: int, seed: int, epoch: int) -> np.ndarray:
    inv = np.empty(n, dtype=np.int64)
    inv[epoch_permutation(n, seed, epoch)] = np.arange(n)
    return inv


class EpochCursor:
    """The same visiting order without Redis, for one process (the local driver): epoch ``e`` visits
    :func:`epoch_permutation` ``(n, seed, e)``; :meth:`state` is JSON-able for checkpoints."""

    def __init__(self, n: int, seed: int, epochs: int, state: dict | None = None) -> None:
        self.n, self.seed, self.epochs = n, seed, epochs
        self.epoch, self.index = (int(state["epoch"]), int(state["index"])) if state else (0, 0)

    def next(self) -> tuple[int, int] | None:
        """``(epoch, prompt index)`` or None when every epoch is used up."""
        if self.index >= self.n:
            self.epoch, self.index = self.epoch + 1, 0
        if self.epoch >= self.epochs:
            return None
        item = (self.epoch, int(epoch_permutation(self.n, self.seed, self.epoch)[self.index]))
        self.index += 1
        return item

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


class PromptDispatcher:
    """Exactly-once prompt dispatch for ``epochs`` shuffled passes over ``prompt_ids``."""

    def __init__(
        self, client: redis.Redis, run_name: str, prompt_ids: list[str], seed: int, epochs: int
    ) -> None:
        if not prompt_ids:
            raise QueueError("prompt dispatch needs at least one prompt id")
        if len(set(prompt_ids)) != len(prompt_ids):
            raise QueueError("prompt ids must be unique (a duplicate id would be trained twice per epoch)")
        if epochs < 1:
            raise QueueError(f"epochs must be >= 1, not {epochs}")
        self.redis = client
        kw = client.connection_pool.connection_kwargs
        self._where = f"redis://{kw.get('host', '?')}:{kw.get('port', '?')}"
        self.run_name = run_name
        self.prompt_ids = list(prompt_ids)
        self.n = len(prompt_ids)
        self.seed = int(seed)
        self.epochs = int(epochs)
        self._index = {p: i for i, p in enumerate(self.prompt_ids)}
        self.run_keys = RunKeys(run_name)
        self.stream_key = self.run_keys.trees
        self.keys = {
            "meta": self.run_keys.prompts_meta,
            "cursor": self.run_keys.prompts_cursor,
            "retry": self.run_keys.prompts_retry,
            "generators": self.run_keys.prompts_generators,
            "reissued": self.run_keys.prompts_reissued,
            "reissued_count": self.run_keys.reissued_stale,
        }
        self._claim = client.register_script(_CLAIM)
        self._requeue = client.register_script(_REQUEUE)
        self._requeue_some = client.register_script(_REQUEUE_SOME)
        self._push_done = client.register_script(_PUSH_DONE)
        self._reissue = client.register_script(_REISSUE)
        digest = hashlib.sha256("\n".join(self.prompt_ids).encode()).hexdigest()
        n, s, d = self._call(
            client.register_script(_META),
            keys=[self.keys["meta"]],
            args=[self.n, self.seed, digest, self.epochs],
        )
        if (int(n), int(s), as_str(d)) != (self.n, self.seed, digest):
            raise QueueError(
                f"prompt dispatch state of run {run_name!r} was created for {int(n)} prompts with seed "
                f"{int(s)} and a different prompt list; resume with the same data and data.shuffle_seed, "
                "or use a new run name"
            )

    def _call(self, fn, *args: Any, **kwargs: Any):
        return guarded(self.redis, self._where, fn, *args, **kwargs)

    # ------------------------------------------------------------------ positions
    @property
    def total(self) -> int:
        return self.n * self.epochs

    def prompt_at(self, position: int) -> tuple[int, str]:
        """``(epoch, prompt_id)`` at a global cursor position."""
        epoch, k = divmod(int(position), self.n)
        return epoch, self.prompt_ids[int(epoch_permutation(self.n, self.seed, epoch)[k])]

    def position_of(self, epoch: int, prompt_id: str) -> int:
        try:
            index = self._index[prompt_id]
        except KeyError:
            raise QueueError(f"unknown prompt id {prompt_id!r}") from None
        return int(epoch) * self.n + int(_inverse(self.n, self.seed, int(epoch))[index])

    def _inflight_key(self, generator_id: int | str) -> str:
        return self.run_keys.prompts_inflight(generator_id)

    # ------------------------------------------------------------------ dispatch
    def claim(self, generator_id: int | str, n: int) -> list[tuple[int, str]]:
        """Up to ``n`` prompts for ``generator_id`` (retries first, then the cursor); [] when exhausted."""
        if n <= 0:
            return []
        positions = self._call(
            self._claim,
            keys=[
                self.keys["cursor"],
                self.keys["retry"],
                self._inflight_key(generator_id),
                self.keys["generators"],
            ],
            args=[int(n), self.total, f"{time.time():.3f}", str(generator_id)],
        )
        return [self.prompt_at(int(p)) for p in positions]

    def done(self, generator_id: int | str, epoch: int, prompt_id: str) -> bool:
        """Clear a prompt's in-flight record; False if it was not in flight for this generator."""
        pos = self.position_of(epoch, prompt_id)
        return bool(self._call(self.redis.hdel, self._inflight_key(generator_id), str(pos)))

    def push_and_done(
        self, queue: ReplayQueue, tree: Tree, generator_id: int | str, epoch: int, prompt_id: str
    ) -> str | None:
        """Push ``tree`` and clear its prompt's in-flight record atomically (one script).

        Returns the entry id, or None (nothing pushed) when the prompt is no longer in flight for
        this generator because it was re-issued. ``queue`` must use the same Redis server.
        """
        if queue.run_name != self.run_name:
            raise QueueError(f"queue run {queue.run_name!r} differs from dispatcher run {self.run_name!r}")
        data = queue.encode(tree)
        pos = self.position_of(epoch, prompt_id)
        entry = self._call(
            self._push_done,
            keys=[self._inflight_key(generator_id), self.stream_key],
            args=[str(pos), data, FIELD_TREE, SCHEMA_VERSION, FIELD_SCHEMA],
        )
        return as_str(entry) if entry else None

    def requeue_generator(self, generator_id: int | str) -> int:
        """Re-issue a dead generator's in-flight prompts (claimed before the cursor advances)."""
        return int(
            self._call(self._requeue, keys=[self._inflight_key(generator_id), self.keys["retry"]], args=[])
        )

    def requeue_positions(self, generator_id: int | str, exclude: set[int]) -> int:
        """Re-issue the prompts in flight for ``generator_id`` except the positions ``exclude`` (what
        the generator knows it grows): the rest were claimed by a call whose reply was lost."""
        rows = self._call(self.redis.hkeys, self._inflight_key(generator_id))
        orphans = sorted(int(p) for p in rows if int(p) not in exclude)
        if not orphans:
            return 0
        return int(
            self._call(
                self._requeue_some,
                keys=[self._inflight_key(generator_id), self.keys["retry"]],
                args=[str(p) for p in orphans],
            )
        )

    def reissue(self, entry_id: str, epoch: int, prompt_id: str) -> bool:
        """Re-issue the prompt of the tree in queue entry ``entry_id`` (dropped for staleness): onto
        the retry list, once per entry. False when this entry's prompt was re-issued before."""
        pos = self.position_of(epoch, prompt_id)
        keys = [self.keys["reissued"], self.keys["retry"], self.keys["reissued_count"]]
        return bool(self._call(self._reissue, keys=keys, args=[str(entry_id), str(pos)]))

    def forget_reissued(self, entry_ids: list[str]) -> None:
        """The re-issue records of entries acknowledged (never delivered again): no longer needed."""
        for i in range(0, len(entry_ids), 1000):
            self._call(self.redis.hdel, self.keys["reissued"], *entry_ids[i : i + 1000])

    def prune_reissued(self, pending: set[str]) -> None:
        """Keep the re-issue records of the ``pending`` entries only (on resume: the others were
        acknowledged, e.g. by a checkpoint whose acknowledgement a crash cut short)."""
        done = [as_str(i) for i in self._call(self.redis.hkeys, self.keys["reissued"])]
        self.forget_reissued([i for i in done if i not in pending])

    def reissued_total(self) -> int:
        """Prompts re-issued for staleness in this run, over every resume."""
        return int(self._call(self.redis.get, self.keys["reissued_count"]) or 0)

    def generator_ids(self) -> list[str]:
        """Every generator id that ever claimed a prompt in this run."""
        return sorted(as_str(x) for x in self._call(self.redis.smembers, self.keys["generators"]))

    def requeue_older_than(self, max_age_s: float) -> int:
        """Re-issue every prompt in flight for longer than ``max_age_s`` (a hung generator, or a
        claim whose reply was lost and retried); returns how many."""
        cutoff = time.time() - max_age_s
        n = 0
        for g in (as_str(x) for x in self._call(self.redis.smembers, self.keys["generators"])):
            rows = self._call(self.redis.hgetall, self._inflight_key(g))
            old = sorted((int(p) for p, t in rows.items() if float(t) < cutoff))
            if old:
                n += int(
                    self._call(
                        self._requeue_some,
                        keys=[self._inflight_key(g), self.keys["retry"]],
                        args=[str(p) for p in old],
                    )
                )
        return n

    # ------------------------------------------------------------------ state
    def _cursor_value(self) -> int:
        return int(self._call(self.redis.get, self.keys["cursor"]) or 0)

    def cursor(self) -> dict[str, int]:
        """The global cursor: next epoch and position within it, positions handed out, total."""
        c = self._cursor_value()
        epoch, pos = divmod(c, self.n)
        return {"epoch": epoch, "position": pos, "claimed": c, "total": self.total}

    def in_flight(self) -> dict[str, list[tuple[int, str, float]]]:
        """Per generator: ``(epoch, prompt_id, claimed_at)`` of every prompt in flight."""
        out: dict[str, list[tuple[int, str, float]]] = {}
        for g in sorted(as_str(x) for x in self._call(self.redis.smembers, self.keys["generators"])):
            rows = self._call(self.redis.hgetall, self._inflight_key(g))
            if rows:
                out[g] = sorted((*self.prompt_at(int(p)), float(t)) for p, t in rows.items())
        return out

    def retry(self) -> list[tuple[int, str]]:
        return [self.prompt_at(int(p)) for p in self._call(self.redis.lrange, self.keys["retry"], 0, -1)]

    def exhausted(self) -> bool:
        """No prompt left to claim (cursor at the end, retry list empty); some may still be in flight."""
        return self._cursor_value() >= self.total and not self._call(self.redis.llen, self.keys["retry"])

    def finished(self) -> bool:
        """Exhausted and nothing in flight."""
        return self.exhausted() and not self.in_flight()

    def state(self) -> dict[str, Any]:
        """JSON-able snapshot for a checkpoint (Redis stays the source of truth on resume)."""
        return {
            "run": self.run_name,
            "n": self.n,
            "seed": self.seed,
            "epochs": self.epochs,
            "cursor": self.cursor(),
            "retry": [list(x) for x in self.retry()],
            "in_flight": {g: [list(x) for x in rows] for g, rows in self.in_flight().items()},
            "exhausted": self.exhausted(),
        }
