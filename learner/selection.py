"""Which sampled trees a learner step trains on, and what the step reports about them — one rule for
both drivers (the local one and the asynchronous pipeline).

- Staleness of a leaf = the learner's policy version − the OLDEST version on the leaf's path (a prefix
  sampled under ``v`` and a branch under ``v+1`` is as stale as ``v``). A tree is as stale as its
  stalest leaf.
- Across a resume the version numbers continue past every version published before the stop, so a
  number never names two different weights; the resumed learner's first version holds the weights of
  the checkpoint's version. :class:`VersionLineage` maps numbers back to optimizer steps, so a tree
  re-delivered after a resume is as stale as the updates that really lie between its weights and the
  learner's (0 for a tree sampled under the checkpoint's weights), not as the numbers say.
- A tree past the staleness limit (``algo.max_staleness`` in the pipeline; the local driver samples
  every tree under the current weights and has no limit) is dropped and counted (:func:`is_stale`);
  the pipeline re-issues its prompt, so no prompt is lost to staleness.
- With ``algo.dynamic_sampling`` (DAPO's filter, as the release runs it on accuracy) a tree whose
  leaves are all correct or all wrong is dropped and counted (:func:`dynamic_sampling_keep`). It is
  judged on each leaf's verdict (``Leaf.correct``, the reward's correct/wrong before the overlong
  penalty), never on the spread of the rewards: a length penalty makes an all-wrong tree's rewards
  differ (``[-1, -1, -1.4, -1]``) without giving it anything to learn but length.
- Everything sampled counts in the step's reward metrics (what the policy does, before any filter;
  accuracy is the share of correct verdicts) and in its ``tree/`` metrics (depths, branching,
  fallbacks, decoded vs flat tokens, finish reasons: :class:`common.sampling_metrics.TreeTally`); the
  trained trees give the trained reward, response length and leaves per tree.

Pure: no torch, ray or redis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.sampling_metrics import TreeTally

KEPT, STALE, UNIFORM = "kept", "stale", "uniform"


def dynamic_sampling_keep(correct_L: Sequence[bool] | np.ndarray) -> bool:
    """Keep a prompt only if some of its leaves are correct and some wrong (a single leaf never is)."""
    correct_L = np.asarray(correct_L, dtype=bool)
    return bool(correct_L.any()) and not bool(correct_L.all())


@dataclass(frozen=True)
class VersionLineage:
    """The policy versions' history across resumes, as ``jumps``: ``(c, n)`` = a resume loaded the
    checkpoint of version ``c`` and numbered on from ``n`` (past every version published before the
    stop). Version ``n`` holds ``c``'s weights; the versions strictly between them were a branch that
    the stop lost (trained from ``c``, never checkpointed). Without jumps, lag = plain difference."""

    jumps: tuple[tuple[int, int], ...] = ()

    def _position(self, v: int) -> int:
        """Optimizer steps behind a version on the current line (``n`` of a jump counts as ``c``)."""
        return v - sum(n - c for c, n in self.jumps if n <= v)

    def lag(self, sampled: int, now: int) -> int:
        """Optimizer updates between the weights of version ``sampled`` and the learner's at ``now``:
        on the current line, the steps between them; on a lost branch, its steps past the branch point
        plus the current line's steps since that point (the updates differ both ways)."""
        for c, n in self.jumps:
            if c < sampled < n:
                return (sampled - c) + self._position(now) - self._position(c)
        return self._position(now) - self._position(sampled)

    def after_resume(self, checkpoint_version: int, numbered_from: int) -> VersionLineage:
        if numbered_from == checkpoint_version:
            return self
        return VersionLineage((*self.jumps, (int(checkpoint_version), int(numbered_from))))

    def to_json(self) -> list[list[int]]:
        return [[c, n] for c, n in self.jumps]

    @classmethod
    def from_json(cls, raw: Any) -> VersionLineage:
        return cls(tuple((int(c), int(n)) for c, n in (raw or [])))


PLAIN = VersionLineage()


def leaf_staleness_L(tree: Any, version: int, lineage: VersionLineage = PLAIN) -> list[int]:
    """Versions behind ``version`` of every leaf: the largest lag of the versions on its path (with
    no resume in between: ``version`` − the oldest version on the path)."""
    if not lineage.jumps:
        return [int(version) - tree.oldest_version(lf) for lf in tree.leaves]
    return [
        max(lineage.lag(v, int(version)) for v in {s.version for s in tree.path(lf.node_id)})
        for lf in tree.leaves
    ]


def tree_staleness(tree: Any, version: int, lineage: VersionLineage = PLAIN) -> int:
    """The stalest leaf of ``tree`` (0 for a tree without leaves)."""
    return max(leaf_staleness_L(tree, version, lineage), default=0)


def is_stale(tree: Any, version: int, max_staleness: int | None, lineage: VersionLineage = PLAIN) -> bool:
    """Past the staleness limit at learner version ``version`` (``max_staleness=None``: no limit)."""
    return max_staleness is not None and tree_staleness(tree, version, lineage) > max_staleness


def record_staleness(
    trees: Sequence[Any], version: int, hist: dict[int, int], lineage: VersionLineage = PLAIN
) -> list[int]:
    """Staleness of every leaf of ``trees`` (see :func:`leaf_staleness_L`), also counted into ``hist``."""
    out = [s for t in trees for s in leaf_staleness_L(t, version, lineage)]
    for s in out:
        hist[s] = hist.get(s, 0) + 1
    return out


@dataclass
class Selection:
    """One step's filter over the trees as they arrive: :meth:`offer` each one, train on :attr:`kept`.

    ``max_staleness=None``: no staleness limit (the local driver)."""

    version: int
    max_staleness: int | None = None
    dynamic_sampling: bool = True
    kept: list = field(default_factory=list)
    sampled: int = 0  # every tree offered (duplicates included)
    dropped_stale: int = 0
    dropped_uniform: int = 0
    lineage: VersionLineage = PLAIN
    rewards_T_L: list = field(default_factory=list)  # every non-duplicate tree's leaf rewards
    correct_T_L: list = field(default_factory=list)  # ... and verdicts
    tally: TreeTally = field(default_factory=TreeTally)  # ... and their structure

    def skip_duplicate(self) -> None:
        """A tree seen before (at-least-once delivery): counted as sampled, never trained twice."""
        self.sampled += 1

    def offer(self, tree: Any) -> str:
        """Judge one tree: :data:`KEPT` (appended to :attr:`kept`), :data:`STALE` or :data:`UNIFORM`."""
        self.sampled += 1
        self.rewards_T_L.append(tree.rewards_L)
        self.correct_T_L.append(tree.correct_L)
        self.tally.add(tree)
        if is_stale(tree, self.version, self.max_staleness, self.lineage):
            self.dropped_stale += 1
            return STALE
        if self.dynamic_sampling and not dynamic_sampling_keep(self.correct_T_L[-1]):
            self.dropped_uniform += 1
            return UNIFORM
        self.kept.append(tree)
        return KEPT

    @property
    def dropped(self) -> int:
        return self.dropped_stale + self.dropped_uniform

    def metrics(self) -> dict[str, float]:
        """Counts of the step's selection, the reward and the tree structure over everything sampled."""
        return {
            "rollout/trees_sampled": self.sampled,
            "rollout/trees_dropped_uniform": self.dropped_uniform,
            **sampled_reward_metrics(self.rewards_T_L, self.correct_T_L),
            **{k: m.value for k, m in self.tally.metrics().items()},
        }


def sampled_reward_metrics(rewards_T_L: list[np.ndarray], correct_T_L: list[np.ndarray]) -> dict[str, float]:
    """Reward and accuracy (share of correct verdicts) over EVERY tree sampled this step (before any
    filter: what the policy does)."""
    rewards = np.concatenate(rewards_T_L) if rewards_T_L else np.zeros(0)
    if not len(rewards):
        return {}
    return {
        "rollout/reward": float(rewards.mean()),
        "rollout/accuracy": float(np.concatenate(correct_T_L).mean()),
    }


def rollout_metrics(trees: Sequence[Any]) -> dict[str, float]:
    """Reward of the trees trained on (after filtering) and their response length."""
    rewards = np.concatenate([t.rewards_L for t in trees])
    lengths = [lf.length for t in trees for lf in t.leaves]
    return {
        "rollout/trained_reward": float(rewards.mean()),
        "rollout/response_len": float(np.mean(lengths)),
    }


def staleness_metrics(trees: Sequence[Any], stale_L: Sequence[int]) -> dict[str, float]:
    """The versions a trained batch was sampled under and how far its leaves lag the learner."""
    versions = [s.version for t in trees for s in t.segments]
    return {
        "rollout/segment_version_min": float(min(versions)),
        "rollout/segment_version_max": float(max(versions)),
        "staleness/mean": float(np.mean(stale_L)) if len(stale_L) else 0.0,
        "staleness/max": float(max(stale_L)) if len(stale_L) else 0.0,
    }
