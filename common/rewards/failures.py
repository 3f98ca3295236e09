"""Reward failures counted per training step, the same way for both drivers.

A reward call that fails (the function raised, returned something that is no number, a batched
function returned the wrong number of values, no answer within ``reward.timeout_s``) scores wrong
(:class:`common.rewards.base.Reward`). Left at that, a function that always fails scores every leaf
wrong, dynamic sampling drops every tree, and the run ends having trained nothing; one that often
fails trains on noise. So:

- scoring (:func:`actors.scoring.score_trees`, in the generators or the local driver) marks each tree
  with how many of its leaves' calls failed and the first failure's text (:func:`mark_tree`: two
  optional metadata scalars, ``FAILED_KEY`` and ``FIRST_KEY``; a tree without them, e.g. queued by
  an older build, counts as none failed);
- the driver adds up the trees of a step in a :class:`StepFailures` (every scored tree: kept and
  dropped ones alike), prints ONE summary line for a step with failures (:meth:`StepFailures.summary`)
  and stops the run with a :class:`common.errors.RewardError` naming the function and its first error
  when the failed share of a step's calls passes ``reward.max_error_share``
  (:meth:`StepFailures.check`: as soon as a step's worth of calls is counted, so a step that never
  completes because every tree is dropped stops too; and at the end of every step).

A verifier worker logs the first failure of each kind once (:meth:`Reward._failed`); nothing prints a
line per failed call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.errors import RewardError

FAILED_KEY = "reward_failed_calls"  # tree metadata: how many of its leaves' reward calls failed
FIRST_KEY = "reward_first_error"  # tree metadata: the first failure's text
MAX_ERROR_CHARS = 300  # of the first error's text carried with a tree and printed


def mark_tree(metadata: dict[str, Any], errors: Sequence[str]) -> None:
    """Record a tree's failed calls (``errors``: one text per leaf, ``""`` when its call succeeded)."""
    failed = [e for e in errors if e]
    if failed:
        metadata[FAILED_KEY] = len(failed)
        metadata[FIRST_KEY] = " ".join(failed[0].split())[:MAX_ERROR_CHARS]


def tree_failures(tree: Any) -> tuple[int, int, str]:
    """(calls, failed calls, first error) of a scored tree, from its metadata (bounded by its leaves)."""
    calls = len(tree.leaves)
    failed = tree.metadata.get(FAILED_KEY, 0)
    failed = min(max(failed, 0), calls) if isinstance(failed, int) and not isinstance(failed, bool) else 0
    first = str(tree.metadata.get(FIRST_KEY, "")) if failed else ""
    return calls, failed, first


def reward_label(cfg: Any) -> str:
    """The reward as the user named it: ``reward.url``, or ``reward.fn`` with a file's name only."""
    if getattr(cfg, "url", ""):
        return str(cfg.url)
    module, _, name = str(cfg.fn).rpartition(":")
    return f"{Path(module).name}:{name}" if module.endswith(".py") else str(cfg.fn)


class StepFailures:
    """Failed reward calls of the step being collected (see the module docstring).

    ``step_calls``: the calls of one step's kept trees (``learner.prompts_per_step * tree.w``); the
    bound is checked once that many were counted."""

    def __init__(self, label: str, max_share: float, step_calls: int) -> None:
        self.label, self.max_share, self.step_calls = label, float(max_share), max(1, int(step_calls))
        self.calls = self.failed = 0
        self.first = ""

    @classmethod
    def for_run(cls, cfg: Any) -> StepFailures:
        """The counter of a training run's config."""
        return cls(
            reward_label(cfg.reward),
            cfg.reward.max_error_share,
            cfg.learner.prompts_per_step * cfg.tree.w,
        )

    def add_tree(self, tree: Any) -> None:
        calls, failed, first = tree_failures(tree)
        self.calls += calls
        self.failed += failed
        if failed and not self.first:
            self.first = first

    @property
    def share(self) -> float:
        return self.failed / self.calls if self.calls else 0.0

    def check(self, final: bool = False) -> None:
        """RewardError when the failed share passes the bound, judged once a step's worth of calls
        is counted (``final``: on whatever was counted, at the end of a step or of the data)."""
        if not self.failed or (not final and self.calls < self.step_calls):
            return
        if self.share > self.max_share:
            raise RewardError(
                f"reward {self.label} failed on {self.failed} of {self.calls} calls of a step "
                f"({self.share:.0%}, more than reward.max_error_share={self.max_share:g}); first error: "
                f"{self.first}; fix the function (it must return one finite number per response) or "
                "raise reward.max_error_share"
            )

    def summary(self, step: int) -> str | None:
        """The step's one console line about failed calls (None when none failed)."""
        if not self.failed:
            return None
        return (
            f"[reward] step {step}: {self.failed}/{self.calls} calls failed ({self.label}), scored wrong; "
            f"first error: {self.first}"
        )

    def close_step(self) -> dict[str, float]:
        """The end of a step: the bound checked on all its calls, its metrics, the count reset."""
        self.check(final=True)
        m = {"reward/failed_calls": float(self.failed), "reward/failed_share": self.share}
        self.calls = self.failed = 0
        self.first = ""
        return m


__all__ = [
    "FAILED_KEY",
    "FIRST_KEY",
    "StepFailures",
    "mark_tree",
    "reward_label",
    "tree_failures",
]
