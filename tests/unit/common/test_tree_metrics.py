"""Tree metrics (common/sampling_metrics.py) on hand-built trees with known depths, branching,
fallbacks and token counts: exact values, and their combination over sources by declared reduction."""

from __future__ import annotations

import pytest
from trees import deep_tree, wire_tree

from common.metrics import reduce_metrics
from common.sampling_metrics import SamplingStats, TreeTally, tree_metrics
from common.tree import Leaf, Segment, Tree


def test_exact_values_on_one_tree():
    m = tree_metrics([deep_tree()])
    assert m["tree/trees"] == 1 and m["tree/leaves"] == 3
    assert (m["tree/leaf_depth/2"], m["tree/leaf_depth/3"]) == (1, 2)
    assert m["tree/leaf_depth_mean"] == pytest.approx(8 / 3)
    # the root has one child, node 1 two, node 2 two; leaves have none (no key for depth 3)
    assert (m["tree/branching/0"], m["tree/branching/1"], m["tree/branching/2"]) == (1.0, 2.0, 2.0)
    assert "tree/branching/3" not in m
    assert (m["tree/fallbacks"], m["tree/restarts"]) == (2, 1)
    # decoded once: 5 segments x 2 tokens; the same leaves sampled independently: 6 + 6 + 4
    assert (m["tree/distinct_tokens"], m["tree/leaf_tokens"]) == (10, 16)
    assert m["tree/decoded_vs_flat"] == pytest.approx(10 / 16)
    assert m["tree/decoded_per_leaf"] == pytest.approx(10 / 3)
    assert m["tree/flat_per_leaf"] == pytest.approx(16 / 3)
    assert (m["tree/finish/finished"], m["tree/finish/eos"], m["tree/finish/max_depth"]) == (1, 1, 1)


def test_two_trees_pool_their_nodes_and_leaves():
    # make_tree: root -> 1 -> {2, 3}; root -> 4; leaves 2, 3 (depth 2), 4 (depth 1); 7 distinct, 9 flat
    m = tree_metrics([deep_tree(), wire_tree()])
    assert m["tree/leaf_depth_mean"] == pytest.approx((8 + 5) / 6)
    assert m["tree/leaf_depth/1"] == 1 and m["tree/leaf_depth/2"] == 3 and m["tree/leaf_depth/3"] == 2
    assert m["tree/branching/0"] == pytest.approx(3 / 2)  # 1 + 2 root children over two roots
    assert m["tree/branching/1"] == pytest.approx(4 / 2)  # node 1 of each tree: 2 + 2 children
    assert m["tree/decoded_vs_flat"] == pytest.approx(17 / 25)
    assert m["tree/fallbacks"] == 2 and m["tree/restarts"] == 1  # make_tree carries none


def test_a_flat_tree_decodes_what_flat_sampling_does():
    segs = [Segment(i, 0, 1, [i] * 3, [0.0] * 3, 0) for i in (1, 2, 3, 4)]
    flat = Tree("f", "p", [0], segs, [Leaf(i, "eos", 3) for i in (1, 2, 3, 4)])
    m = tree_metrics([flat])
    assert m["tree/decoded_vs_flat"] == 1.0 and m["tree/leaf_depth_mean"] == 1.0
    assert m["tree/branching/0"] == 4.0 and m["tree/restarts"] == 0


def test_sources_combine_by_declared_reduction():
    a, b = TreeTally().update([deep_tree()]), TreeTally().update([wire_tree()])
    combined = reduce_metrics([a.metrics(), b.metrics()])
    one = tree_metrics([deep_tree(), wire_tree()])
    for key in ("tree/leaves", "tree/leaf_depth_mean", "tree/branching/0", "tree/branching/1"):
        assert combined[key] == pytest.approx(one[key]), key
    assert combined["tree/decoded_vs_flat"] == pytest.approx(one["tree/decoded_vs_flat"])


def test_sampling_stats_split_engine_and_tree_keys():
    stats = SamplingStats()
    stats.record_tree(deep_tree())
    assert all(k.startswith("rollout/") for k in stats.engine_metrics())
    assert stats.as_dict()["tree/leaf_depth_mean"] == pytest.approx(8 / 3)
    assert TreeTally().metrics() == {}
