"""The one factory of rewards: :func:`resolve_reward` builds what ``reward.fn`` / ``reward.url`` name."""

from __future__ import annotations

from typing import Any

from common.config import RewardConfig
from common.errors import RewardError
from common.rewards.base import RewardFn
from common.rewards.builtin import ArithReward, AutoReward, MathReward
from common.rewards.pool import VerifierPool, shared_pool
from common.rewards.server import HttpReward
from common.rewards.user import user_reward
from common.tasks import TASKS as SYNTHETIC_TASKS


def resolve_reward(
    spec: str = "auto",
    task: str | None = None,
    *,
    cfg: RewardConfig | None = None,
    max_response_tokens: int | None = None,
    pool: VerifierPool | None = None,
) -> RewardFn:
    """Build the reward named by ``reward.fn``, checked at start-up (RewardError names the fix).

    ``spec``: auto | math | arith | package.module:function. ``task``: the synthetic task the data
    comes from (``"arith"``), ``"math"``, or None (unknown: ``auto`` then decides per row from
    ``metadata["task"]``). ``cfg``: a :class:`common.config.RewardConfig` (timeout_s, correct,
    wrong, overlong_buffer); ``max_response_tokens`` is needed when ``overlong_buffer > 0``.
    """
    kw: dict[str, Any] = {"max_response_tokens": max_response_tokens, "pool": pool}
    if cfg is not None:
        kw.update(
            correct=cfg.correct, wrong=cfg.wrong, timeout_s=cfg.timeout_s, overlong_buffer=cfg.overlong_buffer
        )
        if pool is None:  # reward.workers verifier subprocesses, each capped at reward.worker_memory_mb
            kw["pool"] = shared_pool(cfg.workers, getattr(cfg, "worker_memory_mb", None))
    url = getattr(cfg, "url", "") if cfg is not None else ""
    if url:  # a reward server (common.rewards.server); config validation refuses it beside a reward.fn
        return HttpReward(url, retries=getattr(cfg, "retries", 3), **kw)
    if spec == "auto":
        if task is None:
            return AutoReward(**kw)
        spec = task
    if spec == "math":
        return MathReward(**kw)
    if spec in SYNTHETIC_TASKS:  # arith and every other synthetic task: the boxed integer
        return ArithReward(**kw)
    if ":" in spec:  # package.module:function or file.py:function, in any of the three forms
        return user_reward(spec, **kw)
    raise RewardError(
        f"reward {spec!r} is unknown: use auto, math, arith or a 'package.module:function' path"
        + (f" (task {task!r} has no built-in reward)" if task else "")
    )


def reward_range(cfg: RewardConfig) -> tuple[float, float]:
    """The lowest and highest reward a leaf can get from ``cfg``; the queue refuses a tree outside it
    (:func:`common.tree.check_for_run`). The built-in rewards give ``reward.correct`` or
    ``reward.wrong`` (a failed call scores wrong); user functions and reward servers return any finite
    value, bounded by ``reward.max_abs``; the overlong penalty subtracts up to 1 (at ``len >= Lmax``)."""
    lo, hi = float(cfg.wrong), float(cfg.correct)
    if cfg.url or ":" in cfg.fn:  # what resolve_reward builds as a user function or a reward server
        lo, hi = min(lo, -float(cfg.max_abs)), max(hi, float(cfg.max_abs))
    if cfg.overlong_buffer > 0:
        lo -= 1.0
    return lo, hi


__all__ = [
    "resolve_reward",
    "reward_range",
]
