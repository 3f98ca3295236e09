"""Readable rollouts: a sampled tree, its advantages and a tokenizer's ``decode`` as one JSON record.

:func:`tree_record` is the one place a tree becomes something a person reads: ``rollouts.jsonl``
(``log.rollouts_every_steps``), the W&B rollouts table, and any other report of sampled trees.
The record::

    {"tree_id", "prompt_id", "prompt", "gold", "generator",
     "leaves": [{"text", "answer", "reward", "correct", "advantage", "finish_reason", "depth",
                 "tokens", "versions"}, ...]}

``versions`` lists the policy version of each segment on the leaf's path, root first (a path that
spans a weight update shows two versions); ``depth`` is the number of segments; ``advantage`` the
leaf's scalar advantage as trained (after batch whitening). Non-finite numbers become ``null``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from common.tree import Tree

DecodeFn = Callable[[Sequence[int]], str]


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def tree_record(tree: Tree, advantages_L: Sequence[float] | None, decode: DecodeFn) -> dict[str, Any]:
    """A tree as a JSON-ready record (see the module docstring). ``advantages_L``: one scalar per leaf
    in ``tree.leaves`` order, or None (not trained: ``advantage`` is null). ``decode``: token ids ->
    text, e.g. ``lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)``."""
    if advantages_L is not None and len(advantages_L) != len(tree.leaves):
        raise ValueError(f"tree {tree.tree_id}: {len(advantages_L)} advantages for {len(tree.leaves)} leaves")
    leaves = []
    for i, leaf in enumerate(tree.leaves):
        path = tree.path(leaf.node_id)
        leaves.append(
            {
                "text": decode(tree.response_ids(leaf).tolist()),
                "answer": leaf.answer,
                "reward": _num(leaf.reward),
                "correct": leaf.correct,
                "advantage": None if advantages_L is None else _num(advantages_L[i]),
                "finish_reason": leaf.finish_reason,
                "depth": len(path),
                "tokens": int(leaf.length),
                "versions": [int(s.version) for s in path],
            }
        )
    return {
        "tree_id": tree.tree_id,
        "prompt_id": tree.prompt_id,
        "prompt": decode(tree.prompt_ids.tolist()),
        "gold": tree.metadata.get("answer"),
        "generator": int(tree.generator_id),
        "leaves": leaves,
    }


def due(step: int, every_steps: int) -> bool:
    """Whether ``step``'s rollouts are written (``log.rollouts_every_steps``; 0 = never)."""
    return every_steps > 0 and step % every_steps == 0


def step_records(trees: Sequence[Tree], advantages_P_L: Sequence[Any], decode: DecodeFn) -> list[dict]:
    """:func:`tree_record` for every tree of a step."""
    return [tree_record(t, a, decode) for t, a in zip(trees, advantages_P_L, strict=True)]
