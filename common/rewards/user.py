"""The rewards of user functions (``reward.fn=package.module:function`` or ``file.py:function``): a
``treepo`` or ``verl`` function scores each response in a verifier worker, a ``batched`` one scores
a whole batch in one worker call (:mod:`common.rewards.user_fns`: the three forms).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import Any

from common.rewards.base import Failed, Job, Reward, RewardItem, Scored, as_items, batch_payload
from common.rewards.user_fns import absolute_spec, import_callable, load_user_fn, reward_kind, reward_value


class UserReward(Reward):
    """A ``package.module:function`` reward, always run in a worker with a deadline."""

    def __init__(self, spec: str, **kw: Any) -> None:
        super().__init__(**kw)
        spec = absolute_spec(spec)  # a file.py path: the same file in every worker
        self.fn = load_user_fn(spec)  # fail at start-up, in this process, with a clear message
        self.spec = self.name = spec

    def _prepare(self, text: str, answer: str, metadata: dict) -> Job:
        req = {"op": "user", "fn": self.spec, "response": text, "answer": answer, "metadata": metadata}
        req["paths"] = [p or os.getcwd() for p in sys.path]
        return Job(req)

    def _finish(self, value: Any) -> float:
        return reward_value(value)


class BatchUserReward(Reward):
    """A batched user function: one worker call per batch; a hang or crash scores the batch wrong."""

    wants_prompts = True

    def __init__(self, spec: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.spec = self.name = absolute_spec(spec)

    def judge_many(self, items: Iterable[RewardItem | tuple]) -> list[Scored]:
        t0 = time.perf_counter()
        items = as_items(items)
        if not items:
            return []
        req = {
            "op": "user_batch",
            "fn": self.spec,
            "paths": [p or os.getcwd() for p in sys.path],
            "items": batch_payload(items),
        }
        outcome = self.pool.call(req, self.timeout_s)
        if outcome.status == "ok":
            base: list[float | Failed] = [float(v) for v in outcome.value]
        else:  # a failed batch: every item of it failed, with the batch's error
            base = [self._resolve(outcome)] * len(items)
        self.stats.add(calls=len(items), seconds=time.perf_counter() - t0)
        return self.verdicts(base, items)


def user_reward(spec: str, **kw: Any) -> Reward:
    """The reward for ``reward.fn=<spec>``: the function is imported here first, so a wrong path or
    signature fails at start-up in this process, with a clear message."""
    spec = absolute_spec(spec)
    kind = reward_kind(import_callable(spec), spec)
    if kind == "batched":
        return BatchUserReward(spec, **kw)
    return UserReward(spec, **kw)


__all__ = [
    "BatchUserReward",
    "UserReward",
    "user_reward",
]
