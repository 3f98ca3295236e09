"""Golden values for TreePO advantages (the worked example of docs/algorithm.md), baselines and whitening."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import AlgoConfig
from learner.advantages import (
    baseline_advantages_L,
    batch_advantages,
    grpo_advantages_L,
    tree_advantages,
    treepo_advantages_L,
    whiten_token_weighted,
)
from learner.synthetic import synthetic_trees

# Worked example: c1 = 1, c2 = 2; c11 = 3, c12 = 4, c21 = 5, c22 = 6; leaves a/b below each.
EXAMPLE_PATHS = [
    [1, 3, 7],  # c1/c11/a
    [1, 3, 8],  # c1/c11/b
    [1, 4, 9],  # c1/c12/a
    [1, 4, 10],  # c1/c12/b
    [2, 5, 11],  # c2/c21/a
    [2, 5, 12],  # c2/c21/b
    [2, 6, 13],  # c2/c22/a
    [2, 6, 14],  # c2/c22/b
]
EXAMPLE_R = np.array([1, 1, 1, -1, -1, -1, 1, -1], dtype=float)
# rows of the worked example in docs/algorithm.md: leaf index -> (average, group_size)
EXAMPLE_TABLE = {
    0: (0.500, 0.714),
    2: (0.833, 0.857),
    3: (-1.167, -1.143),
    4: (-0.500, -0.714),
    6: (1.167, 1.143),
}


@pytest.mark.parametrize("aggregation, column", [("average", 0), ("group_size", 1)])
def test_worked_example(aggregation, column):
    adv_L = treepo_advantages_L(EXAMPLE_R, EXAMPLE_PATHS, aggregation)
    for leaf, row in EXAMPLE_TABLE.items():
        assert round(adv_L[leaf], 3) == pytest.approx(row[column], abs=1e-9), (leaf, adv_L[leaf])


def test_worked_example_by_symmetry():
    # leaves that share everything but their own (singleton) node get the same value
    adv_L = treepo_advantages_L(EXAMPLE_R, EXAMPLE_PATHS, "average")
    assert adv_L[0] == pytest.approx(adv_L[1])
    assert adv_L[4] == pytest.approx(adv_L[5])


def test_flat_tree_is_reward_minus_mean():
    rng = np.random.default_rng(3)
    R = rng.normal(size=7)
    paths = [[i + 1] for i in range(7)]  # every leaf its own root child: all subgroups singletons
    for aggregation in ("average", "group_size"):
        np.testing.assert_allclose(treepo_advantages_L(R, paths, aggregation), R - R.mean())
    np.testing.assert_allclose(baseline_advantages_L(R), R - R.mean())


def test_singleton_subgroups_are_skipped_even_deep():
    # a chain below each root child: every depth >= 2 node holds one leaf
    R = np.array([1.0, -1.0, -1.0])
    paths = [[1, 3, 4, 5], [1, 6, 7], [2, 8]]
    adv = treepo_advantages_L(R, paths, "average")
    mean0 = R.mean()
    # leaves 0 and 1 share node 1 (a pair); leaf 2 is alone below the root
    assert adv[0] == pytest.approx(((1 - mean0) + (1 - 0.0)) / 2)
    assert adv[1] == pytest.approx(((-1 - mean0) + (-1 - 0.0)) / 2)
    assert adv[2] == pytest.approx(-1 - mean0)


def test_subgroup_std_filter_drops_agreeing_groups():
    adv = treepo_advantages_L(EXAMPLE_R, EXAMPLE_PATHS, "average", subgroup_std_filter=True)
    # c1/c11/a: depth-0 term 1, c1 term 0.5, c11 (+1,+1) dropped
    assert adv[0] == pytest.approx((1 + 0.5) / 2)
    # c1/c12/a: nothing agrees on its path, unchanged
    assert adv[2] == pytest.approx(treepo_advantages_L(EXAMPLE_R, EXAMPLE_PATHS)[2])


def test_whitening_is_token_weighted_with_unbiased_std():
    adv_P_L = [np.array([0.5, -1.0, 2.0]), np.array([0.3, 0.0])]
    len_P_L = [np.array([3, 1, 5]), np.array([2, 0])]
    out = whiten_token_weighted(adv_P_L, len_P_L)
    tokens = np.concatenate([np.repeat(a, n) for a, n in zip(adv_P_L, len_P_L)])
    mu, sd = tokens.mean(), tokens.std(ddof=1)
    for a, o in zip(adv_P_L, out):
        np.testing.assert_allclose(o, (a - mu) / np.sqrt(sd**2 + 1e-8))
    # the whitened tokens have mean 0 and unbiased std ~1
    w_tokens = np.concatenate([np.repeat(o, n) for o, n in zip(out, len_P_L)])
    assert abs(w_tokens.mean()) < 1e-12
    assert w_tokens.std(ddof=1) == pytest.approx(1.0, rel=1e-6)


def test_grpo_divides_by_group_std():
    R = np.array([1.0, -1.0, -1.0, 1.0, 1.0])
    expected = (R - R.mean()) / (R.std(ddof=1) + 1e-6)
    np.testing.assert_allclose(grpo_advantages_L(R), expected)
    assert grpo_advantages_L(np.array([1.0])).tolist() == [0.0]


def test_batch_estimators_and_whitening_switch():
    rewards = [EXAMPLE_R, np.array([1.0, -1.0])]
    paths = [EXAMPLE_PATHS, [[1], [2]]]
    lens = [np.full(8, 4), np.array([2, 6])]
    raw = batch_advantages(rewards, paths, lens, "treepo", whiten=False)
    np.testing.assert_allclose(raw[0], treepo_advantages_L(EXAMPLE_R, EXAMPLE_PATHS))
    np.testing.assert_allclose(raw[1], [1.0, -1.0])
    white = batch_advantages(rewards, paths, lens, "treepo", whiten=True)
    for a, b in zip(white, whiten_token_weighted(raw, lens)):
        np.testing.assert_allclose(a, b)
    base = batch_advantages(rewards, paths, lens, "reinforce_pp_baseline", whiten=True)
    expected = whiten_token_weighted([r - r.mean() for r in rewards], lens)
    for a, b in zip(base, expected):
        np.testing.assert_allclose(a, b)
    grpo = batch_advantages(rewards, paths, lens, "grpo", whiten=False)
    np.testing.assert_allclose(grpo[1], grpo_advantages_L(rewards[1]))


def test_tree_objects_match_arrays():
    trees = synthetic_trees(3, w=4, depth=3, seed=5)
    algo = AlgoConfig(aggregation="group_size")
    got = tree_advantages(trees, algo)
    expected = batch_advantages(
        [t.rewards_L for t in trees],
        [t.leaf_paths() for t in trees],
        [np.array([lf.length for lf in t.leaves]) for t in trees],
        aggregation="group_size",
    )
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b)
