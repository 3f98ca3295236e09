"""What every reward shares: the items it scores, its counters, and :class:`Reward`, the machinery of
in-process decisions, isolated jobs in the verifier pool, counting, the overlong penalty and the
verdict (judged before the penalty; :mod:`common.rewards`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from common.data import full_metadata
from common.errors import RewardError
from common.rewards.pool import Outcome, VerifierPool, shared_pool
from common.rewards.verify import overlong_penalty

log = logging.getLogger(__name__)
_LOGGED_KINDS: set[tuple[str, str]] = set()  # (reward name, failure kind) already logged by this process


@dataclass
class RewardStats:
    """Counters of one reward function (thread-safe). ``in_process``: calls decided without a worker."""

    calls: int = 0
    timeouts: int = 0
    errors: int = 0
    in_process: int = 0
    seconds: float = 0.0
    last_error: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **inc: Any) -> None:
        with self._lock:
            for k, v in inc.items():
                if k == "last_error":
                    self.last_error = v
                else:
                    setattr(self, k, getattr(self, k) + v)

    def __getstate__(self) -> dict[str, Any]:  # picklable (e.g. returned from a Ray actor): drop the lock
        with self._lock:
            return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def as_metrics(self, prefix: str = "reward/") -> dict[str, float]:
        with self._lock:
            return {
                f"{prefix}calls": self.calls,
                f"{prefix}timeouts": self.timeouts,
                f"{prefix}errors": self.errors,
                f"{prefix}in_process": self.in_process,
                f"{prefix}seconds": self.seconds,
            }


class Scored(NamedTuple):
    """One scored response: the reward (penalty included), the verdict (judged before the penalty) and,
    when the call failed (an error or a timeout, scored wrong), what went wrong."""

    reward: float
    correct: bool
    error: str = ""


class RewardItem(NamedTuple):
    """One response to score (a plain 4-tuple works too)."""

    response_text: str
    answer: str
    metadata: dict | None = None
    response_len: int = 0
    prompt: str = ""  # filled for rewards with ``wants_prompts`` (batched user functions, reward servers)


@runtime_checkable
class RewardFn(Protocol):
    """What generators call: ``fn(text, answer, metadata, response_len)`` or ``fn.score_many(items)``."""

    name: str
    stats: RewardStats

    def __call__(
        self, response_text: str, answer: str, metadata: dict | None = None, response_len: int = 0
    ) -> float: ...

    def score_many(self, items: Iterable[RewardItem | tuple]) -> list[float]: ...

    def judge_many(self, items: Iterable[RewardItem | tuple]) -> list[Scored]: ...


def as_items(items: Iterable[RewardItem | tuple]) -> list[RewardItem]:
    """Items as :class:`RewardItem` (plain tuples are accepted)."""
    return [RewardItem(*it) for it in items]


def batch_payload(items: Sequence[RewardItem]) -> list[dict]:
    """Items as whole-batch scorers receive them (batched user functions, reward servers): the
    prompt, response and answer as text, and the row's full metadata (nested values in place)."""
    return [
        {
            "prompt": str(it.prompt),
            "response": str(it.response_text),
            "answer": str(it.answer),
            "metadata": full_metadata(it.metadata),
        }
        for it in items
    ]


class Job(NamedTuple):
    """A request for a verifier worker; its value goes through the reward's ``_finish``."""

    req: dict


class Failed(NamedTuple):
    """An item whose call failed: it scores ``wrong``; ``detail`` says why."""

    detail: str


class Reward:
    """Shared machinery: in-process decisions, isolated jobs, counting, the overlong penalty."""

    name = "reward"

    def __init__(
        self,
        *,
        correct: float = 1.0,
        wrong: float = -1.0,
        timeout_s: float = 5.0,
        overlong_buffer: int = 0,
        max_response_tokens: int | None = None,
        pool: VerifierPool | None = None,
    ) -> None:
        if overlong_buffer > 0 and not max_response_tokens:
            raise RewardError(
                f"reward.overlong_buffer={overlong_buffer} needs the maximum response length: pass "
                "max_response_tokens (tree.max_response_tokens) or set reward.overlong_buffer=0"
            )
        if max_response_tokens and overlong_buffer > max_response_tokens:
            raise RewardError(
                f"reward.overlong_buffer={overlong_buffer} > max_response_tokens={max_response_tokens}: lower it"
            )
        self.correct, self.wrong, self.timeout_s = float(correct), float(wrong), float(timeout_s)
        self.overlong_buffer, self.max_response_tokens = int(overlong_buffer), int(max_response_tokens or 0)
        self._pool = pool
        self.stats = RewardStats()

    @property
    def pool(self) -> VerifierPool:
        if self._pool is None or self._pool.owner_pid != os.getpid():
            old = self._pool
            self._pool = shared_pool(old and old.num_workers, old and old.memory_mb)
        return self._pool

    def _prepare(self, text: str, answer: str, metadata: dict) -> float | Job:
        """The base score now, or a Job for a verifier worker (its value then goes through _finish).
        Rewards that score whole batches override ``judge_many`` instead and never reach this."""
        raise TypeError(f"{type(self).__name__} scores whole batches through judge_many, not one item")

    def _finish(self, value: Any) -> float:
        return self.correct if value else self.wrong

    def _shape(self, base: float, response_len: int) -> float:
        if self.overlong_buffer <= 0:
            return base
        return base + overlong_penalty(response_len, self.max_response_tokens, self.overlong_buffer)

    def _resolve(self, outcome: Outcome) -> float | Failed:
        """A worker's outcome as a base reward, or the failure (counted, scored wrong)."""
        if outcome.status == "ok":
            try:
                return self._finish(outcome.value)
            except (TypeError, ValueError) as e:
                outcome = Outcome("error", detail=f"{type(e).__name__}: {e}")
        if outcome.status == "timeout":
            return self._failed(
                f"timeout: {outcome.detail} (reward.timeout_s={self.timeout_s:g})", timeout=True
            )
        return self._failed(outcome.detail)

    def _failed(self, detail: str, timeout: bool = False) -> Failed:
        """Count one failed call; the first failure of each kind (its exception type) is logged once,
        the later ones only counted (the drivers print one summary line a step, common.rewards.failures)."""
        if timeout:
            self.stats.add(timeouts=1)
        else:
            self.stats.add(errors=1, last_error=detail)
        kind = (self.name, detail.partition(":")[0])
        if kind not in _LOGGED_KINDS:  # one line per reward and kind in this process (training and eval)
            _LOGGED_KINDS.add(kind)
            log.warning(
                "reward %s failed: %s (scored as wrong; later failures of this kind are counted, not logged)",
                self.name,
                detail,
            )
        return Failed(detail)

    def _prepare_counted(self, text: str, answer: str, metadata: dict) -> float | Job | Failed:
        try:
            return self._prepare(text, answer, metadata)
        except Exception as e:  # an in-process check that fails scores wrong, counted, like a worker crash
            return self._failed(f"{type(e).__name__}: {e}")

    def __call__(
        self, response_text: str, answer: str, metadata: dict | None = None, response_len: int = 0
    ) -> float:
        return self.score_many([(response_text, answer, metadata, response_len)])[0]

    def score_many(self, items: Iterable[RewardItem | tuple]) -> list[float]:
        return [s.reward for s in self.judge_many(items)]

    def judge_many(self, items: Iterable[RewardItem | tuple]) -> list[Scored]:
        """Reward and verdict of every item (one batch: verifier calls run in parallel)."""
        t0 = time.perf_counter()
        items = as_items(items)
        base_I: list[float | Failed | None] = [None] * len(items)
        jobs: list[tuple[int, dict]] = []
        for i, it in enumerate(items):
            r = self._prepare_counted(str(it.response_text), str(it.answer), dict(it.metadata or {}))
            if isinstance(r, Job):
                jobs.append((i, r.req))
            else:
                base_I[i] = r
        if jobs:
            outcomes = self.pool.map([req for _, req in jobs], self.timeout_s)
            for (i, _), out in zip(jobs, outcomes):
                base_I[i] = self._resolve(out)
        self.stats.add(calls=len(items), in_process=len(items) - len(jobs), seconds=time.perf_counter() - t0)
        return self.verdicts(base_I, items)  # type: ignore[arg-type]

    def verdicts(self, base_I: Sequence[float | Failed], items: Sequence[RewardItem]) -> list[Scored]:
        """Each item's reward (its base plus the overlong penalty) and verdict (the base above the
        midpoint of ``correct`` and ``wrong``); a failed item scores ``wrong`` and carries its error."""
        midpoint = (self.correct + self.wrong) / 2
        out = []
        for b, it in zip(base_I, items):
            error = b.detail if isinstance(b, Failed) else ""
            base = self.wrong if isinstance(b, Failed) else float(b)
            out.append(Scored(self._shape(base, it.response_len), base > midpoint, error))
        return out


__all__ = [
    "Failed",
    "Job",
    "Reward",
    "RewardFn",
    "RewardItem",
    "RewardStats",
    "Scored",
    "as_items",
    "batch_payload",
]
