"""Scoring finished trees: decode each leaf's response, fill its reward and extracted answer; the
verdict on one problem's answers.

Rewards are computed in one batch per tree (``RewardFn.score_many``), so verifier subprocesses work
in parallel; a crashing or timed-out reward scores as wrong and is counted by the reward's stats.
A leaf is correct when its reward is above the midpoint of the reward's correct and wrong values
(:func:`correct_threshold`); the majority answer is :func:`common.eval_metrics.majority_vote`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from common.answers import last_boxed
from common.eval_metrics import majority_vote
from common.rewards import RewardFn, RewardItem
from common.tree import Tree

DecodeFn = Callable[[Sequence[int]], str]


def leaf_texts(tree: Tree, decode: DecodeFn, eos_ids: frozenset[int] = frozenset()) -> list[str]:
    """Response text of every leaf (a trailing EOS token is not part of the text)."""
    texts = []
    for leaf in tree.leaves:
        ids = tree.response_ids(leaf).tolist()
        if ids and ids[-1] in eos_ids:
            ids = ids[:-1]
        texts.append(decode(ids))
    return texts


def score_trees(
    trees: Sequence[Tree], reward: RewardFn | None, decode: DecodeFn, eos_ids: frozenset[int] = frozenset()
) -> None:
    """Set ``leaf.answer`` and (unless ``reward`` is None) ``leaf.reward`` for every leaf of every tree
    (in place)."""
    items, slots = [], []
    for tree in trees:
        answer = str(tree.metadata.get("answer", ""))
        for leaf, text in zip(tree.leaves, leaf_texts(tree, decode, eos_ids)):
            leaf.answer = last_boxed(text)
            items.append(RewardItem(text, answer, dict(tree.metadata), leaf.length))
            slots.append(leaf)
    if reward is None:
        return
    for leaf, value in zip(slots, reward.score_many(items)):
        leaf.reward = float(value)


def reward_bounds(reward: RewardFn) -> tuple[float, float]:
    """(correct, wrong) values of a reward (defaults +1/-1 for user functions without them)."""
    return float(getattr(reward, "correct", 1.0)), float(getattr(reward, "wrong", -1.0))


def correct_threshold(reward: RewardFn) -> float:
    """A reward above this value means a correct answer: the midpoint of correct and wrong."""
    correct, wrong = reward_bounds(reward)
    return (correct + wrong) / 2


def majority_verdict(answers: Sequence[str | None], correct: Sequence[bool]) -> tuple[str | None, bool]:
    """The majority answer of a problem's leaves and whether a correct leaf gave it."""
    majority = majority_vote(answers)
    return majority, majority is not None and any(a == majority and c for a, c in zip(answers, correct))
