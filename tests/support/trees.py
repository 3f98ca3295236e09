"""Small hand-built trees shared by the wire, rollout and tree tests.

:func:`small_tree`: root -> 1 (v0) -> {2 (v1), 3 (v1)}; root -> 4 (v0); leaves 2, 3, 4 — three
leaves of different depths and finish reasons, every segment with its own behaviour log-probs.
:func:`wire_tree`: the same tree as it comes off the queue (epoch and timings set).
:func:`deep_tree`: root -> 1 -> {2 -> {4, 5}, 3}, with a fallback and a restart counted.
"""

from __future__ import annotations

from typing import Any

from common.sampling_metrics import FALLBACKS_KEY, RESTARTS_KEY
from common.tree import Leaf, Segment, Tree


def small_tree(last_leaf: Leaf | None = None, **tree_kw: Any) -> Tree:
    """The three-leaf tree above; ``last_leaf`` replaces leaf 4 (correct, answer "7", by default) and
    ``tree_kw`` sets Tree fields (metadata defaults to ``{"answer": "7"}``, generator 2)."""
    segs = [
        Segment(1, 0, 1, [10, 11], [-0.5, -0.25], 0),
        Segment(2, 1, 2, [12], [-1.0], 1),
        Segment(3, 1, 2, [13, 14, 15], [-0.1, -0.2, -0.3], 1),
        Segment(4, 0, 1, [16], [-2.0], 0),
    ]
    leaves = [
        Leaf(2, "eos", 3, 1.0, "7", True),
        Leaf(3, "max_depth", 5, -1.0, None, False),
        last_leaf or Leaf(4, "finished", 1, 1.0, "7", True),
    ]
    tree_kw = {"generator_id": 2, "metadata": {"answer": "7"}, **tree_kw}
    return Tree("t-1", "p-1", [1, 2, 3], segs, leaves, **tree_kw)


def wire_tree() -> Tree:
    """:func:`small_tree` with the epoch and timings a generator sets."""
    return small_tree(metadata={"answer": "7", "epoch": 0}, timings={"gen_s": 0.5})


def deep_tree() -> Tree:
    """root -> 1 -> {2 -> {4, 5}, 3}; leaves 4 (depth 3), 5 (depth 3), 3 (depth 2); 2-token segments."""
    segs = [
        Segment(1, 0, 1, [1, 2], [0.0, 0.0], 0),
        Segment(2, 1, 2, [3, 4], [0.0, 0.0], 0),
        Segment(3, 1, 2, [5, 6], [0.0, 0.0], 0),
        Segment(4, 2, 3, [7, 8], [0.0, 0.0], 0),
        Segment(5, 2, 3, [9, 10], [0.0, 0.0], 0),
    ]
    leaves = [Leaf(4, "finished", 6), Leaf(5, "eos", 6), Leaf(3, "max_depth", 4)]
    meta = {FALLBACKS_KEY: 2, RESTARTS_KEY: 1}
    return Tree("t-deep", "p-deep", [0], segs, leaves, metadata=meta)
