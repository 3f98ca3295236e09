"""Trees → leaf sequences.

Each leaf of a tree becomes one training sequence: prompt ids + the response ids along its path.
The loss is on sampled response tokens only; each response token carries its behavior logprob (from
the sampler), the policy version its segment was sampled under, the leaf's advantage and its loss
mask (``loss_mask_R``: 0 on observation tokens, a tool's result that was not sampled, 1 elsewhere).
A masked token is still part of the sequence -- the model reads it, later tokens attend to it --
but it adds nothing to the loss, to its normaliser or to any per-token metric.

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
    loss_mask_R: np.ndarray | None = None  # float32 [R]: 0 on observation tokens; None: all trained

    @property
    def response_len(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def loss_weights_R(self) -> np.ndarray:
        """float32 [R]: each response token's loss weight (``loss_mask_R``, or all ones when None)."""
        R = self.response_len
        if self.loss_mask_R is None:
            return np.ones(R, dtype=np.float32)
        mask = np.asarray(self.loss_mask_R, dtype=np.float32)
        if mask.shape != (R,):
            raise ValueError(f"loss_mask_R has shape {mask.shape}, expected ({R},): one per response token")
        return mask

    @property
    def loss_tokens(self) -> int:
        """Response tokens the loss is taken over (observation tokens excluded)."""
        return int(np.count_nonzero(self.loss_weights_R))


def leaf_sequences(trees: Sequence[Tree], advantages_P_L: Sequence[np.ndarray]) -> list[LeafSequence]:
    """One sequence per leaf with a sampled response token, in tree then leaf order."""
    out: list[LeafSequence] = []
    for tree, adv_L in zip(trees, advantages_P_L, strict=True):
        if len(adv_L) != len(tree.leaves):
            raise ValueError(f"tree {tree.tree_id}: {len(tree.leaves)} leaves but {len(adv_L)} advantages")
        prompt = tree.prompt_ids.astype(np.int64)
        for leaf, adv in zip(tree.leaves, adv_L):
            observed = tree.response_observed(leaf)
            if leaf.length == 0 or observed.all():
                continue  # nothing to train on
            resp = tree.response_ids(leaf).astype(np.int64)
            out.append(
                LeafSequence(
                    token_ids=np.concatenate([prompt, resp]),
                    prompt_len=len(prompt),
                    behavior_logprobs_R=tree.response_logprobs(leaf).astype(np.float32),
                    versions_R=tree.response_versions(leaf),
                    advantage=float(adv),
                    loss_mask_R=(~observed).astype(np.float32) if observed.any() else None,
                )
            )
    return out
