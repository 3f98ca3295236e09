"""Poison queue entries for the exactly-once tests: trees that decode but do not fit the run, one per
kind of :func:`common.tree.check_for_run` plus one that no longer decodes (a string timing).

:func:`poison_entries` returns ``(kind, entry bytes, reason regex)``; the reason is what the
dead-letter stream must record for that entry.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np

from common.tree import Leaf, Segment, Tree, encode_tree


def valid_tree(tree_id: str, prompt_id: str, w: int = 4, seg_tokens: int = 4, version: int = 0) -> Tree:
    """A scored tree of ``w`` leaves (root -> w chains of 2 segments) with small token ids."""
    rng = np.random.default_rng(abs(hash(tree_id)) % 2**32)
    segs, leaves = [], []
    for i in range(w):
        a, b = 1 + 2 * i, 2 + 2 * i
        for node, parent, depth in ((a, 0, 1), (b, a, 2)):
            tokens = rng.integers(3, 20, seg_tokens, dtype=np.int32)
            segs.append(
                Segment(node, parent, depth, tokens, -rng.random(seg_tokens, dtype=np.float32) - 0.1, version)
            )
        leaves.append(Leaf(b, "eos", 2 * seg_tokens, float(i % 2), None, bool(i % 2)))
    return Tree(tree_id, prompt_id, np.arange(3, 11, dtype=np.int32), segs, leaves, metadata={"epoch": 0})


def poison_entries(vocab_size: int, max_prompt_tokens: int, max_response_tokens: int, w: int):
    """One entry per kind of bad tree, with the reason the dead-letter stream must give."""
    out = []

    def add(kind: str, tree: Tree, reason: str) -> None:
        out.append((kind, encode_tree(tree), reason))

    t = valid_tree("poison-vocab@e0", "poison-vocab", w)
    t.segments[0].token_ids[0] = vocab_size
    add("token id >= vocab", t, rf"token id {vocab_size} >= vocab size")
    t = valid_tree("poison-prompt@e0", "poison-prompt", w)
    t.prompt_ids = np.full(max_prompt_tokens + 1, 5, dtype=np.int32)
    add("prompt over its cap", t, r"exceeds data.max_prompt_tokens")
    t = valid_tree("poison-response@e0", "poison-response", w, seg_tokens=max_response_tokens // 2 + 1)
    add("response over its cap", t, r"exceed tree.max_response_tokens")
    t = valid_tree("poison-nan@e0", "poison-nan", w)
    t.leaves[0].reward = math.nan
    add("NaN reward", t, r"reward nan is not finite")
    t = valid_tree("poison-inf@e0", "poison-inf", w)
    t.leaves[1].reward = math.inf
    add("inf reward", t, r"reward inf is not finite")
    t = valid_tree("poison-reward@e0", "poison-reward", w)
    t.leaves[2 % w].reward = 1e6  # finite, but no reward.* config gives it
    add("reward out of range", t, r"reward 1e\+06 is outside \[")
    add(
        "version from the future",
        valid_tree("poison-future@e0", "poison-future", w, version=10**6),
        r"from the future",
    )
    t = valid_tree("poison-leaves@e0", "poison-leaves", w)
    t.leaves = t.leaves[:-1]
    add("leaf count != w", t, rf"{w - 1} leaves, expected tree.w={w}")
    add("unknown prompt", valid_tree("poison-unknown@e0", "poison-unknown", w), r"unknown prompt id")
    # a string timing cannot be encoded by encode_tree: patch the msgpack map
    obj = msgpack.unpackb(encode_tree(valid_tree("poison-timing@e0", "poison-timing", w)), raw=False)
    obj["timings"] = {"sample_s": "slow"}
    out.append(
        ("string timing", msgpack.packb(obj, use_bin_type=True), r"timing 'sample_s' must be a finite number")
    )
    return out
