"""Scoring finished trees: decode each leaf's response, fill its reward and extracted answer.

Rewards are computed in one batch per tree (``RewardFn.score_many``), so verifier subprocesses work
in parallel; a crashing or timed-out reward scores as wrong and is counted by the reward's stats.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from common.rewards import RewardFn, RewardItem, last_boxed
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
    trees: Sequence[Tree], reward: RewardFn, decode: DecodeFn, eos_ids: frozenset[int] = frozenset()
) -> None:
    """Set ``leaf.reward`` and ``leaf.answer`` for every leaf of every tree (in place)."""
    items, slots = [], []
    for tree in trees:
        answer = str(tree.metadata.get("answer", ""))
        for leaf, text in zip(tree.leaves, leaf_texts(tree, decode, eos_ids)):
            items.append(RewardItem(text, answer, dict(tree.metadata), leaf.length))
            slots.append((leaf, text))
    for (leaf, text), value in zip(slots, reward.score_many(items)):
        leaf.reward = float(value)
        leaf.answer = last_boxed(text)
