"""The trees a learner step trains on (learner/selection.py), pure: staleness per leaf, the staleness
and dynamic-sampling filter, and the step's selection metrics."""

from __future__ import annotations

import dataclasses

import pytest
from trees import wire_tree

from common.errors import WireError
from learner.selection import (
    KEPT,
    STALE,
    UNIFORM,
    Selection,
    VersionLineage,
    dynamic_sampling_keep,
    is_stale,
    leaf_staleness_L,
    record_staleness,
    rollout_metrics,
    staleness_metrics,
    tree_staleness,
)


def _tree(tree_id: str, rewards: list[float], version_shift: int = 0, correct: list[bool] | None = None):
    """``wire_tree``'s three leaves with these rewards and verdicts (default: reward > 0)."""
    t = wire_tree()
    t.tree_id = tree_id
    for leaf, r, c in zip(t.leaves, rewards, correct or [r > 0 for r in rewards]):
        leaf.reward, leaf.correct = r, c
    t.segments = [dataclasses.replace(s, version=s.version + version_shift) for s in t.segments]
    return t


def test_a_leaf_is_as_stale_as_the_oldest_segment_on_its_path():
    t = wire_tree()  # leaf 2's path holds versions 0 and 1, leaf 3's too, leaf 4's only 0
    assert leaf_staleness_L(t, 3) == [3, 3, 3]
    assert tree_staleness(t, 3) == 3
    hist: dict[int, int] = {}
    assert record_staleness([t, t], 1, hist) == [1] * 6
    assert hist == {1: 6}


def test_staleness_across_resumes_counts_the_updates_between_the_weights_not_the_numbers():
    """A resume loaded version 4's checkpoint after version 5 had been published (and lost), and
    numbers on from 6 (which holds 4's weights); a second one loaded 7 and numbers on from 10."""
    one = VersionLineage().after_resume(4, 6)
    assert one.jumps == ((4, 6),) and VersionLineage().after_resume(4, 4).jumps == ()
    assert [one.lag(v, 6) for v in (3, 4, 6)] == [1, 0, 0]  # sampled under the checkpoint's line
    assert one.lag(5, 6) == 1 and one.lag(5, 8) == 3  # the lost branch: 1 update off the line, + new ones
    assert one.lag(7, 8) == 1 and one.lag(0, 8) == 6
    two = one.after_resume(7, 10)
    assert two == VersionLineage.from_json(two.to_json())
    assert [two.lag(v, 11) for v in (3, 5, 6, 7, 8, 9, 10, 11)] == [3, 3, 2, 1, 2, 3, 1, 0]
    # a tree sampled under versions 3 and 4 before the stop, re-delivered after it
    t = _tree("redelivered", [1.0, -1.0, 1.0], version_shift=3)
    assert tree_staleness(t, 6) == 3 and tree_staleness(t, 6, one) == 1
    assert leaf_staleness_L(_tree("lost", [1.0] * 3, version_shift=5), 6, one) == [1, 1, 1]
    hist: dict[int, int] = {}
    assert record_staleness([t], 6, hist, one) == [1, 1, 1] and hist == {1: 3}
    assert Selection(6, max_staleness=1, dynamic_sampling=False).offer(t) == STALE
    assert Selection(6, max_staleness=1, dynamic_sampling=False, lineage=one).offer(t) == KEPT


def test_selection_drops_stale_then_uniform_trees_and_counts_everything():
    sel = Selection(version=5, max_staleness=1, dynamic_sampling=True)
    assert sel.offer(_tree("old", [1.0, -1.0, 1.0], version_shift=3)) == STALE  # 5 - 3 = 2 > 1
    assert sel.offer(_tree("same", [1.0, 1.0, 1.0], version_shift=4)) == UNIFORM
    assert sel.offer(_tree("good", [1.0, -1.0, -1.0], version_shift=4)) == KEPT
    sel.skip_duplicate()
    assert [t.tree_id for t in sel.kept] == ["good"]
    assert (sel.sampled, sel.dropped_stale, sel.dropped_uniform, sel.dropped) == (4, 1, 1, 2)
    m = sel.metrics()
    assert m["rollout/trees_sampled"] == 4 and m["rollout/trees_dropped_uniform"] == 1
    assert m["rollout/reward"] == pytest.approx(3 / 9)  # every non-duplicate tree's leaves
    assert m["rollout/accuracy"] == pytest.approx(6 / 9)


def test_is_stale_is_the_rule_the_selection_applies():
    """One rule for the step's filter and the resume's (which drops re-delivered trees before the
    first step): past ``max_staleness`` versions, across a resume by the lineage; no limit: never."""
    t = wire_tree()  # its stalest leaf lags version v by v
    assert [is_stale(t, v, 1) for v in (0, 1, 2)] == [False, False, True]
    assert not is_stale(t, 100, None)
    lineage = VersionLineage().after_resume(0, 5)  # version 5 holds version 0's weights
    assert is_stale(t, 5, 1) and not is_stale(t, 5, 1, lineage)  # the lost branch lags 1, not 5
    sel = Selection(version=2, max_staleness=1, dynamic_sampling=False)
    assert sel.offer(t) == STALE and sel.dropped_stale == 1


def test_without_a_staleness_limit_only_uniform_trees_are_dropped():
    sel = Selection(version=100, max_staleness=None, dynamic_sampling=True)
    assert sel.offer(_tree("old", [1.0, -1.0, 1.0])) == KEPT
    assert Selection(version=0, dynamic_sampling=False).offer(_tree("u", [1.0, 1.0, 1.0])) == KEPT


def test_batch_metrics():
    trees = [_tree("a", [1.0, -1.0, 1.0]), _tree("b", [-1.0, -1.0, 1.0], version_shift=2)]
    m = rollout_metrics(trees)
    assert m["rollout/trained_reward"] == pytest.approx(0.0)
    assert m["rollout/response_len"] == pytest.approx(3.0)
    assert "tree/leaves_per_tree" not in m  # the step's tree/ keys count every tree sampled (Selection)
    s = staleness_metrics(trees, record_staleness(trees, 3, {}))
    assert (s["rollout/segment_version_min"], s["rollout/segment_version_max"]) == (0.0, 3.0)
    assert (s["staleness/mean"], s["staleness/max"]) == (2.0, 3.0)


def test_dynamic_sampling_judges_correctness_not_reward_spread():
    # the overlong penalty spreads the rewards of uniform trees: all wrong with one long leaf, all right
    # with one long leaf; both are dropped, whatever their rewards, and a mixed tree is kept
    assert not dynamic_sampling_keep([False, False, False, False])  # rewards [-1, -1, -1.4, -1]
    assert not dynamic_sampling_keep([True, True, True, True])  # rewards [1, 1, 0.6, 1]
    assert not dynamic_sampling_keep([True])
    assert dynamic_sampling_keep([True, False, False, False])
    sel = Selection(version=0, dynamic_sampling=True)
    assert sel.offer(_tree("wrong", [-1.0, -1.4, -1.0], correct=[False] * 3)) == UNIFORM
    assert sel.offer(_tree("right", [1.0, 0.6, 1.0], correct=[True] * 3)) == UNIFORM
    # a right answer with the full penalty (1 - 1 = 0) is still right: the verdict, not the value
    assert sel.offer(_tree("mixed", [1.0, 0.0, -1.4], correct=[True, True, False])) == KEPT
    assert [t.tree_id for t in sel.kept] == ["mixed"]
    assert sel.metrics()["rollout/accuracy"] == pytest.approx(5 / 9)


def test_an_unscored_tree_is_refused():
    t = _tree("u", [1.0, -1.0, 1.0])
    t.leaves[1].correct = None
    with pytest.raises(WireError, match="no verdict"):
        Selection(version=0).offer(t)
