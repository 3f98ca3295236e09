"""Trees → leaf sequences.

Each leaf of a tree becomes one training sequence: prompt ids + the response ids along its path.
The loss is on response tokens only; each response token carries its behavior logprob (from the
sampler), the policy version its segment was sampled under, and the leaf's advantage.

How sequences become micro-batches and model inputs is ``learner.packing`` (:mod:`learner.packing`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.tree import Tree


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
