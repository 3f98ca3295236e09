"""Scoring finished trees: decode each leaf's response, fill its reward, its verdict and its extracted
answer; the verdict on one problem's answers.

Rewards are computed in one batch per tree (``RewardFn.judge_many``), so verifier subprocesses work
in parallel; a crashing or timed-out reward scores as wrong and is counted by the reward's stats, and
each tree carries how many of its leaves' calls failed and the first error
(:func:`common.rewards.failures.mark_tree`: the drivers count them per step and stop a run whose
reward fails too often).
A leaf's verdict (``Leaf.correct``) is the reward's (:mod:`common.rewards`: above the midpoint of its
correct and wrong values, before the overlong penalty); the majority answer is
:func:`common.eval_metrics.majority_vote`'s.

The text scored is the response up to its first stop, the stop excluded: a stop token (EOS or the chat
template's end of turn, :func:`common.models.stop_token_ids`) or a stop string (``generators.stop``);
nothing after a stop can count (:class:`common.stops.StopRule`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from common.answers import last_boxed
from common.eval_metrics import majority_vote
from common.rewards import RewardFn, RewardItem
from common.rewards.failures import mark_tree
from common.stops import StopRule
from common.tree import Tree

DecodeFn = Callable[[Sequence[int]], str]


StopArg = StopRule | Iterable[int]


def leaf_texts(tree: Tree, decode: DecodeFn, stop: StopArg = frozenset()) -> list[str]:
    """Response text of every leaf, up to (not including) its first stop token or stop string
    (``stop``: a :class:`common.stops.StopRule` or stop token ids)."""
    rule = StopRule.of(stop)
    return [rule.response_text(tree.response_ids(leaf).tolist(), decode) for leaf in tree.leaves]


def score_trees(
    trees: Sequence[Tree], reward: RewardFn | None, decode: DecodeFn, stop: StopArg = frozenset()
) -> None:
    """Set ``leaf.answer`` and (unless ``reward`` is None) ``leaf.reward`` and ``leaf.correct`` for every
    leaf of every tree (in place)."""
    items, slots = [], []
    wants_prompts = bool(getattr(reward, "wants_prompts", False))  # batched user functions, reward servers
    for t, tree in enumerate(trees):
        answer = str(tree.metadata.get("answer", ""))
        prompt = decode(tree.prompt_ids.tolist()) if wants_prompts else ""
        for leaf, text in zip(tree.leaves, leaf_texts(tree, decode, stop)):
            leaf.answer = last_boxed(text)
            items.append(RewardItem(text, answer, dict(tree.metadata), leaf.length, prompt))
            slots.append((t, leaf))
    if reward is None:
        return
    errors: dict[int, list[str]] = {}  # per tree (by position): the failure text of each leaf's call
    for (t, leaf), scored in zip(slots, reward.judge_many(items)):
        leaf.reward, leaf.correct = float(scored.reward), bool(scored.correct)
        errors.setdefault(t, []).append(getattr(scored, "error", ""))
    for t, tree in enumerate(trees):
        mark_tree(tree.metadata, errors.get(t, ()))


def majority_verdict(answers: Sequence[str | None], correct: Sequence[bool]) -> tuple[str | None, bool]:
    """The majority answer of a problem's leaves and whether a correct leaf gave it."""
    majority = majority_vote(answers)
    return majority, majority is not None and any(a == majority and c for a, c in zip(answers, correct))
