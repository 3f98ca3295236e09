"""Advantages: TreePO's tree-structured estimator, GRPO and REINFORCE++-baseline, batch whitening.

TreePO (the rule the authors' release trains with, see ``docs/algorithm.md``). For leaf ``i`` of a
prompt with reward ``R_i`` and root→leaf node path ``p_i``:

- ``G_0(i)`` = all leaves of the prompt; ``G_j(i)`` = the leaves whose first ``j`` path nodes are
  ``i``'s (node ids are unique, so sharing node ``p_i[j-1]`` means sharing the whole prefix).
- Terms: depth 0 always; depth ``j >= 1`` only when ``|G_j(i)| >= 2`` (singleton subgroups carry no
  baseline and are skipped). ``a_ij = R_i - mean(R over G_j(i))`` -- no per-group std.
- Optional ``subgroup_std_filter`` (off by default, it hurt in the paper): also skip depth ``j >= 1``
  terms whose subgroup rewards all agree. The depth-0 term is always kept.
- Aggregation ``average``: ``A_i = mean_j a_ij``; ``group_size``: ``sum_j |G_j| a_ij / sum_j |G_j|``.
- The leaf's scalar is spread over its response tokens, then whitened over ALL valid tokens of the
  batch with the token-weighted mean and the unbiased (n-1) std: ``(A - mu) / sqrt(var + 1e-8)``.

Paper vs release: Eq. 5 of the paper writes a std term whose scope (per subgroup or per batch) is
ambiguous; the release divides by no subgroup std and whitens once over the batch. We follow the
release. A flat tree (no shared segments) reduces to ``R_i - mean(R)`` before whitening.

Baselines for comparison:

- ``grpo``: ``(R_i - mean(R)) / (std(R) + 1e-6)`` per prompt with the unbiased std (as in
  DeepSeekMath's GRPO); a group of one gets 0. Batch whitening still follows ``AlgoConfig.whiten``.
- ``reinforce_pp_baseline``: ``R_i - mean(R)`` per prompt, then the batch whitening.

Prompt-level dynamic sampling (DAPO) drops prompts whose leaves are all correct or all wrong before
advantages are computed: :mod:`learner.selection` holds that rule.

Everything here is pure numpy: no torch, no distributed state.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence

import numpy as np

from common.config import AdvantageEstimator, Aggregation
from common.errors import ConfigError

WHITEN_EPS = 1e-8
GRPO_STD_EPS = 1e-6
AGGREGATIONS = typing.get_args(Aggregation)  # algo.aggregation's values, declared with the field
ESTIMATORS = typing.get_args(AdvantageEstimator)  # algo.advantage's values


def treepo_advantages_L(
    rewards_L: np.ndarray,
    leaf_paths_L: Sequence[Sequence[int]],
    aggregation: str = "average",
    subgroup_std_filter: bool = False,
) -> np.ndarray:
    """Per-leaf TreePO advantage of one prompt's tree (before whitening)."""
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"aggregation={aggregation!r} is not one of {AGGREGATIONS}: set algo.aggregation")
    rewards_L = np.asarray(rewards_L, dtype=np.float64)
    n = len(rewards_L)
    if n != len(leaf_paths_L):
        raise ValueError(f"{n} rewards but {len(leaf_paths_L)} leaf paths: pass one path per leaf")
    if n == 0:
        return np.zeros(0)
    # members[(depth, node)] = leaves whose path passes through `node` at that depth
    members: dict[tuple[int, int], list[int]] = {}
    for i, path in enumerate(leaf_paths_L):
        for j, node in enumerate(path, start=1):
            members.setdefault((j, int(node)), []).append(i)
    out_L = np.zeros(n)
    root_mean = rewards_L.mean()
    for i, path in enumerate(leaf_paths_L):
        terms = [rewards_L[i] - root_mean]
        sizes = [n]
        for j, node in enumerate(path, start=1):
            group = members[(j, int(node))]
            if len(group) < 2:
                continue
            group_R = rewards_L[group]
            if subgroup_std_filter and np.ptp(group_R) == 0:
                continue
            terms.append(rewards_L[i] - group_R.mean())
            sizes.append(len(group))
        terms_a, sizes_a = np.asarray(terms), np.asarray(sizes, dtype=np.float64)
        if aggregation == "average":
            out_L[i] = terms_a.mean()
        else:
            out_L[i] = (sizes_a * terms_a).sum() / sizes_a.sum()
    return out_L


def grpo_advantages_L(rewards_L: np.ndarray) -> np.ndarray:
    """(R - mean) / (unbiased std + 1e-6) within one prompt's group; a group of one gets 0."""
    rewards_L = np.asarray(rewards_L, dtype=np.float64)
    if len(rewards_L) < 2:
        return np.zeros(len(rewards_L))
    return (rewards_L - rewards_L.mean()) / (rewards_L.std(ddof=1) + GRPO_STD_EPS)


def baseline_advantages_L(rewards_L: np.ndarray) -> np.ndarray:
    """REINFORCE++-baseline before whitening: R - mean(R) within the prompt's group."""
    rewards_L = np.asarray(rewards_L, dtype=np.float64)
    return rewards_L - rewards_L.mean() if len(rewards_L) else np.zeros(0)


def whiten_token_weighted(
    advantages_P_L: Sequence[np.ndarray], lengths_P_L: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """Whiten per-leaf scalars as if each were repeated over its leaf's response tokens.

    The mean and the unbiased variance are over all tokens of the batch (a leaf of n tokens counts
    n times); leaves of zero tokens do not count. With fewer than two tokens the variance is 0.
    """
    adv = [np.asarray(a, dtype=np.float64) for a in advantages_P_L]
    lens = [np.asarray(n, dtype=np.float64) for n in lengths_P_L]
    for a, n in zip(adv, lens, strict=True):
        if a.shape != n.shape:
            raise ValueError(f"advantages {a.shape} and lengths {n.shape} differ: pass one length per leaf")
    if not adv:
        return []
    flat_A, flat_n = np.concatenate(adv), np.concatenate(lens)
    total = flat_n.sum()
    if total <= 0:
        return [np.zeros_like(a) for a in adv]
    mean = (flat_n * flat_A).sum() / total
    var = (flat_n * (flat_A - mean) ** 2).sum() / (total - 1) if total > 1 else 0.0
    scale = 1.0 / np.sqrt(var + WHITEN_EPS)
    return [(a - mean) * scale for a in adv]


def batch_advantages(
    rewards_P_L: Sequence[np.ndarray],
    leaf_paths_P_L: Sequence[Sequence[Sequence[int]]],
    lengths_P_L: Sequence[np.ndarray],
    estimator: str = "treepo",
    aggregation: str = "average",
    subgroup_std_filter: bool = False,
    whiten: bool = True,
) -> list[np.ndarray]:
    """Per-leaf advantages for a batch of prompts (the same value on every response token of a leaf).

    ``lengths_P_L`` are trained (sampled) response token counts (the whitening weights). Filtering (dynamic sampling,
    staleness) happens before: every prompt passed here is trained on.
    """
    if estimator not in ESTIMATORS:
        raise ConfigError(f"advantage={estimator!r} is not one of {ESTIMATORS}: set algo.advantage")
    raw_P_L = []
    for rewards_L, paths_L in zip(rewards_P_L, leaf_paths_P_L, strict=True):
        if estimator == "treepo":
            raw_P_L.append(treepo_advantages_L(rewards_L, paths_L, aggregation, subgroup_std_filter))
        elif estimator == "grpo":
            raw_P_L.append(grpo_advantages_L(rewards_L))
        else:
            raw_P_L.append(baseline_advantages_L(rewards_L))
    return whiten_token_weighted(raw_P_L, lengths_P_L) if whiten else raw_P_L


def tree_advantages(trees: Sequence, algo) -> list[np.ndarray]:
    """``batch_advantages`` for :class:`common.tree.Tree` objects under an ``AlgoConfig``."""
    return batch_advantages(
        [t.rewards_L for t in trees],
        [t.leaf_paths() for t in trees],
        [np.array([t.sampled_length(lf) for lf in t.leaves]) for t in trees],  # trained tokens only
        estimator=algo.advantage,
        aggregation=algo.aggregation,
        subgroup_std_filter=algo.subgroup_std_filter,
        whiten=algo.whiten,
    )
