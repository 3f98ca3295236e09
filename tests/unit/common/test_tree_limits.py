"""The run-level check of a decoded tree (common.tree.check_for_run): every kind of tree that decodes
but does not fit the run is refused with its reason; a tree that fits passes."""

from __future__ import annotations

import pytest
from poison import poison_entries, valid_tree

from common.config import RewardConfig
from common.errors import WireError
from common.rewards import ArithReward, RewardItem
from common.rewards.resolve import reward_range
from common.tree import RunLimits, check_for_run, decode_tree

LIMITS = dict(
    vocab_size=64, max_prompt_tokens=16, max_response_tokens=12, leaves=4, epochs=2, rewards=(-1.0, 1.0)
)


def limits(version: int = 3, prompts=("p-1",)) -> RunLimits:
    return RunLimits(**LIMITS, max_version=lambda: version, prompt_ids=frozenset(prompts))


def test_a_tree_that_fits_the_run_passes():
    tree = valid_tree("p-1@e1", "p-1", w=4, seg_tokens=4, version=3)
    check_for_run(tree, limits())


@pytest.mark.parametrize(
    "kind,data,reason", poison_entries(64, 16, 12, 4), ids=lambda x: x if isinstance(x, str) else ""
)
def test_each_kind_of_bad_tree_is_refused_with_its_reason(kind, data, reason):
    with pytest.raises(WireError, match=reason):  # a string timing fails decode_tree already
        check_for_run(decode_tree(data), limits())


def test_tree_ids_must_name_their_prompt_and_a_run_epoch():
    with pytest.raises(WireError, match="is not '<prompt id>@e<epoch>'"):
        check_for_run(valid_tree("p-1@e2", "p-1"), limits())  # data.epochs=2: epochs 0 and 1
    with pytest.raises(WireError, match="is not '<prompt id>@e<epoch>'"):
        check_for_run(valid_tree("p-2@e0", "p-1"), limits())


@pytest.mark.parametrize(
    "reward,ok", [(-1.0, True), (1.0, True), (-1.0001, False), (1.5, False), (1e6, False)]
)
def test_a_reward_outside_what_the_reward_config_gives_is_refused(reward, ok):
    tree = valid_tree("p-1@e0", "p-1", w=4)
    tree.leaves[3].reward = reward
    if ok:
        check_for_run(tree, limits())
    else:
        with pytest.raises(WireError, match=r"leaf 8: reward .* is outside \[-1, 1\].*reward.max_abs"):
            check_for_run(tree, limits())


@pytest.mark.parametrize(
    "settings,expected",
    [
        ({}, (-1.0, 1.0)),  # the built-in rewards: correct or wrong
        ({"fn": "math", "correct": 2.0, "wrong": 0.5}, (0.5, 2.0)),
        ({"fn": "arith", "overlong_buffer": 4}, (-2.0, 1.0)),  # the overlong penalty: down to -1 more
        ({"fn": "pkg.mod:score"}, (-100.0, 100.0)),  # user functions: +-reward.max_abs
        ({"fn": "pkg.mod:score", "max_abs": 0.5}, (-1.0, 1.0)),  # still what a failed call scores
        ({"url": "http://127.0.0.1:1/score", "max_abs": 10.0, "overlong_buffer": 2}, (-11.0, 10.0)),
    ],
)
def test_the_reward_range_follows_the_reward_config(settings, expected):
    assert reward_range(RewardConfig(**settings)) == expected


def test_every_reward_the_built_in_reward_gives_lies_in_its_range():
    """Right and wrong answers at every length up to past Lmax, with the overlong penalty."""
    cfg = RewardConfig(fn="arith", overlong_buffer=4, correct=1.0, wrong=-1.0)
    lo, hi = reward_range(cfg)
    fn = ArithReward(correct=cfg.correct, wrong=cfg.wrong, overlong_buffer=4, max_response_tokens=12)
    items = [
        RewardItem(text, "7", {"task": "arith"}, n)
        for text in ("\\boxed{7}", "\\boxed{8}")
        for n in range(14)
    ]
    rewards = fn.score_many(items)
    assert min(rewards) == lo and max(rewards) == hi
