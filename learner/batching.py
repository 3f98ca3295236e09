"""Trees → leaf sequences → micro-batches.

Each leaf of a tree becomes one training sequence: prompt ids + the response ids along its path.
The loss is on response tokens only; each response token carries its behavior logprob (from the
sampler), the policy version its segment was sampled under, and the leaf's advantage.

Packing: micro-batches hold whole sequences, ONE SEQUENCE PER ROW, right-padded to the longest
row of that micro-batch. A micro-batch is filled greedily in the given order while
``rows × longest_row <= micro_batch_tokens`` (a sequence longer than the budget goes alone). One
sequence per row keeps logprobs exact without per-sequence position ids or block-diagonal masks
(right padding never changes a causal model's outputs at real positions); the price is padding,
which sorting by length before packing keeps small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.tree import Leaf, Segment, Tree


@dataclass
class LeafSequence:
    token_ids: np.ndarray  # int64 [P + R]: prompt then response
    prompt_len: int
    behavior_logprobs_R: np.ndarray  # float32 [R]
    versions_R: np.ndarray  # int64 [R]: policy version each response token was sampled under
    advantage: float  # the leaf's (whitened) advantage, the same on all its response tokens
    prox_logprobs_R: np.ndarray | None = None  # filled by the learner before the update
    ref_logprobs_R: np.ndarray | None = None

    @property
    def response_len(self) -> int:
        return len(self.token_ids) - self.prompt_len


def leaf_sequences(trees: Sequence[Tree], advantages_P_L: Sequence[np.ndarray]) -> list[LeafSequence]:
    """One sequence per leaf with a non-empty response, in tree then leaf order."""
    out: list[LeafSequence] = []
    for tree, adv_L in zip(trees, advantages_P_L, strict=True):
        if len(adv_L) != len(tree.leaves):
            raise ValueError(f"tree {tree.tree_id}: {len(tree.leaves)} leaves but {len(adv_L)} advantages")
        prompt = tree.prompt_ids.astype(np.int64)
        for leaf, adv in zip(tree.leaves, adv_L):
            if leaf.length == 0:
                continue  # nothing to train on
            resp = tree.response_ids(leaf).astype(np.int64)
            out.append(
                LeafSequence(
                    token_ids=np.concatenate([prompt, resp]),
                    prompt_len=len(prompt),
                    behavior_logprobs_R=tree.response_logprobs(leaf).astype(np.float32),
                    versions_R=tree.response_versions(leaf),
                    advantage=float(adv),
                )
            )
    return out


def pack_micro_batches(lengths: Sequence[int], micro_batch_tokens: int) -> list[list[int]]:
    """Greedy, order-preserving grouping of sequence indices: rows × longest row <= the budget."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if current and (len(current) + 1) * max(longest, n) > micro_batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def collate(seqs: Sequence[LeafSequence], pad_id: int, current_version: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded tensors; per-token fields are aligned with the targets ``input_ids[:, 1:]``.

    ``mask`` marks response targets. Fields whose values are missing (prox/ref) are omitted.
    """
    B = len(seqs)
    T = max(len(s.token_ids) for s in seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T - 1))
    behavior = torch.zeros((B, T - 1))
    adv = torch.zeros((B, T - 1))
    staleness = torch.zeros((B, T - 1))
    prox = torch.zeros((B, T - 1)) if all(s.prox_logprobs_R is not None for s in seqs) else None
    ref = torch.zeros((B, T - 1)) if all(s.ref_logprobs_R is not None for s in seqs) else None
    for b, s in enumerate(seqs):
        n, p = len(s.token_ids), s.prompt_len
        input_ids[b, :n] = torch.from_numpy(s.token_ids)
        attention[b, :n] = 1
        # target index t predicts token t+1: response tokens p..n-1 are targets p-1..n-2
        sl = slice(p - 1, n - 1)
        mask[b, sl] = 1.0
        behavior[b, sl] = torch.from_numpy(s.behavior_logprobs_R)
        adv[b, sl] = s.advantage
        staleness[b, sl] = torch.from_numpy(current_version - s.versions_R).float()
        if prox is not None:
            prox[b, sl] = torch.from_numpy(s.prox_logprobs_R)
        if ref is not None:
            ref[b, sl] = torch.from_numpy(s.ref_logprobs_R)
    out = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "mask": mask,
        "behavior_logprobs": behavior,
        "advantages": adv,
        "staleness": staleness,
    }
    if prox is not None:
        out["prox_logprobs"] = prox
    if ref is not None:
        out["ref_logprobs"] = ref
    return out


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
) -> list[Tree]:
    """Deterministic random binary-ish trees with random tokens and ±1 rewards (tests, benchmarks).

    Every path has ``depth`` segments; each level doubles the paths while that stays <= ``w``, then
    paths extend without branching (a tree has min(w, 2**depth) leaves, rounded down to a power of 2).
    ``flat``: ``w`` independent paths from the prompt (no shared segment: GRPO-style sampling).
    ``stop_prob``: after every level but the last a path ends there with this probability, and a
    path's last segment is cut short (an EOS inside it) with this probability, so lengths vary.
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
                    segments.append(Segment(next_id, parent, d, toks, lps, version))
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
