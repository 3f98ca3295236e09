"""Padded rows (``learner.packing=none``): ONE SEQUENCE PER ROW, right-padded to the longest row of
its micro-batch.

A micro-batch is filled greedily, longest sequence first, while ``rows × longest_row <=
micro_batch_tokens`` (a sequence longer than the budget goes alone). One sequence per row keeps
logprobs exact without per-sequence position ids or block-diagonal masks (right padding never changes
a causal model's outputs at real positions); the price is padding, which sorting by length before
packing keeps small, and a token shared by k leaves is computed k times.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from learner.batching import LeafSequence
from learner.loss import entropy_from_logits


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

    ``mask`` is the loss weight of each target: the response targets' ``loss_mask_R`` (0 on observation
    tokens), 0 on prompt and padding targets. Fields whose values are missing (prox/ref) are omitted.
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
        mask[b, sl] = torch.from_numpy(s.loss_weights_R)
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


class PaddedPacker:
    """``learner.packing=none``: a :class:`learner.packing.Packer` of one right-padded row per leaf."""

    mode = "none"

    def __init__(self, attention: str = "auto", pad_id: int = 0) -> None:
        self.pad_id = pad_id  # learner.packed_attention plays no part: the model's own attention

    def prepare_model(self, module: torch.nn.Module) -> None:
        """Nothing to prepare: padded rows take the model's own attention."""

    def plan(self, seqs: Sequence[LeafSequence], budget: int) -> list[list[int]]:
        # longest first, stable: less padding, and the same grouping wherever the same data is seen
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].token_ids))
        groups = pack_micro_batches([len(seqs[i].token_ids) for i in order], budget)
        return [[order[i] for i in g] for g in groups]

    def collate(self, seqs: Sequence[LeafSequence], current_version: int = 0) -> dict:
        return collate(seqs, self.pad_id, current_version=current_version)

    def forward(self, model: torch.nn.Module, module: torch.nn.Module, batch: dict, device: torch.device):
        """Logits [rows, T - 1, vocab], aligned with the targets ``input_ids[:, 1:]``."""
        ids = batch["input_ids"].to(device)
        out = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), use_cache=False)
        return out.logits[:, :-1]

    def logprobs(self, logits: torch.Tensor, batch: dict, entropy: bool = False):
        targets = batch["input_ids"].to(logits.device)[:, 1:]
        logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        ent = entropy_from_logits(logits.detach()) if entropy else None
        return logp, ent

    def response_logprobs(self, logp: torch.Tensor, row: int, seq: LeafSequence) -> np.ndarray:
        lp = logp[row, seq.prompt_len - 1 : len(seq.token_ids) - 1].numpy().astype(np.float32)
        return np.where(seq.loss_weights_R > 0, lp, np.float32(0.0))  # as packed rows: 0.0 on observations

    def computed_tokens(self, seqs: Sequence[LeafSequence]) -> int:
        return len(seqs) * max((len(s.token_ids) for s in seqs), default=0)
