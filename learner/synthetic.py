"""Deterministic random trees for tests and benchmarks (not part of the training path)."""

from __future__ import annotations

import numpy as np

from common.tree import Leaf, Segment, Tree

_EMPTY = np.zeros(0, dtype=np.int32)


def synthetic_trees(
    num_prompts: int,
    w: int = 4,
    depth: int = 2,
    seg_len: int = 4,
    prompt_len: int = 6,
    vocab_size: int = 32,
    seed: int = 0,
    version: int = 0,
    flat: bool = False,
    stop_prob: float = 0.0,
    tool_prob: float = 0.0,
    tool_len: int = 3,
) -> list[Tree]:
    """Deterministic random binary-ish trees with random tokens and ±1 rewards (tests, benchmarks).

    Every path has ``depth`` segments; each level doubles the paths while that stays <= ``w``, then
    paths extend without branching (a tree has min(w, 2**depth) leaves, rounded down to a power of 2).
    ``flat``: ``w`` independent paths from the prompt (no shared segment: GRPO-style sampling).
    ``stop_prob``: after every level but the last a path ends there with this probability, and a
    path's last segment is cut short (an EOS inside it) with this probability, so lengths vary.
    ``tool_prob``: a segment ends in a tool call with this probability: ``tool_len`` observation
    tokens (:attr:`common.tree.Segment.observed`, logprob 0.0) follow its sampled tokens, shared by
    the paths below it.
    Behavior logprobs are random negatives, so the data is off-policy on purpose.
    """
    rng = np.random.default_rng(seed)
    trees = []
    for p in range(num_prompts):
        segments: list[Segment] = []
        next_id = 1
        live = [0]  # parent ids of live paths
        ended: list[int] = []
        for d in range(1, depth + 1):
            if flat:
                kids = w if d == 1 else 1
            else:
                kids = 2 if 2 * len(live) <= w else 1
            new_live = []
            for parent in live:
                for _ in range(kids):
                    n = seg_len
                    last = d == depth or (stop_prob and rng.random() < stop_prob)
                    if stop_prob and last and rng.random() < stop_prob:
                        n = int(rng.integers(1, seg_len + 1))
                    toks = rng.integers(4, vocab_size, n).astype(np.int32)
                    lps = -rng.uniform(0.05, 3.0, n).astype(np.float32)
                    obs = _EMPTY
                    if tool_prob and rng.random() < tool_prob:
                        obs = rng.integers(4, vocab_size, tool_len).astype(np.int32)
                    segments.append(Segment.with_observation(next_id, parent, d, toks, lps, version, obs))
                    (ended if last and d < depth else new_live).append(next_id)
                    next_id += 1
            live = new_live
        path_len = {0: 0}
        for seg in segments:  # parents come first
            path_len[seg.node_id] = path_len[seg.parent_id] + len(seg.token_ids)
        leaves = [Leaf(node_id=n, finish_reason="eos", length=path_len[n]) for n in ended + live]
        rewards = rng.choice([-1.0, 1.0], len(leaves))
        if np.ptp(rewards) == 0:
            rewards[0] = -rewards[0]
        for leaf, r in zip(leaves, rewards):
            leaf.reward, leaf.correct = float(r), bool(r > 0)
        tree = Tree(f"t{seed}-{p}", f"p{p}", rng.integers(4, vocab_size, prompt_len), segments, leaves)
        tree.validate()
        trees.append(tree)
    return trees
