"""Padding-free (``flat``) and prefix-shared (``tree``) packed rows: every distinct token runs once.

- ``flat``: padding-free. The sequences of a micro-batch are concatenated into ONE row; each keeps its
  own position ids (0, 1, ...) and attends to itself only (a block-diagonal causal mask).
- ``tree``: prefix-shared. Sequences with the same prompt are merged into a prefix tree (a trie on
  token ids): leaf ``i`` shares its longest common prefix ``lcp_i`` with an earlier leaf of the same
  prompt (in a TreePO tree that is the prompt plus the shared segments; in flat/GRPO mode the prompt),
  and only its remaining ``L_i - lcp_i`` tokens are new. A token's position id is its depth in its own
  path and it attends to the tokens on its own root path only, so its hidden states -- and the
  logits of every leaf through it -- are exactly what that leaf's own padded row gives.

Layout. The new tokens of one sequence form a *run*: a contiguous range ``[start, end)`` of the
packed row plus the row indices of its ancestors (the shared prefix, placed earlier). Runs appear in
sequence order, so a token's ancestors always precede it. How a forward attends along the runs is
:mod:`learner.packed_attention` (``learner.packed_attention``).

Loss. The model's logits are computed once per distinct token; the loss is then taken over the
(leaf, token) pairs exactly as in the padded path: ``src[b, t]`` is the packed row index of the token
that predicts leaf ``b``'s response token ``t`` and ``tgt[b, t]`` that token's id, so
``logp[b, t] = logits[src] [tgt] - logsumexp(logits[src])``. The per-pair tensors (behavior, π_prox,
reference logprobs, advantages, staleness) are laid out ``[leaves, longest response]`` like the
padded path's, so :func:`learner.loss.policy_loss` runs unchanged: PPO clip, dual clip, every
importance-weight variant (also the per-sequence ones), the token-mean normaliser and every metric
are exact. ``mask`` is each pair's loss weight: 0 on padding and on observation tokens (every leaf
through a shared observation token masks its own pair), and only rows that predict a trained
target keep their logits. Backpropagating through the gather sums, for a shared token, the gradients of all leaves
through it -- for PPO clipping this equals taking the clipped term per distinct token with the leaves
split by the sign of their advantage (the ratio is shared), without writing that case out. The
scalar work is per pair (cheap); the model's work is per distinct token.

Micro-batches hold whole prefix trees (or, when a tree exceeds ``micro_batch_tokens``, chunks of its
leaves) up to ``micro_batch_tokens`` *computed* tokens, first-fit by decreasing size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from learner.batching import LeafSequence
from learner.loss import entropy_from_logits
from learner.packed_attention import (
    PackedLayout,
    attention_inputs,
    check_attention_ran,
    enable_packed_attention,
    resolve_attention,
)

_EMPTY = np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------------- prefix links
def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    if m == 0:
        return 0
    neq = a[:m] != b[:m]
    k = int(neq.argmax())
    return k if neq[k] else m


def _buckets(seqs: Sequence[LeafSequence], share: bool) -> list[list[int]]:
    """Indices grouped by prompt (in order of first appearance); one per sequence when not sharing."""
    if not share:
        return [[i] for i in range(len(seqs))]
    out: dict[bytes, list[int]] = {}
    for i, s in enumerate(seqs):
        out.setdefault(s.token_ids[: s.prompt_len].tobytes(), []).append(i)
    return list(out.values())


def prefix_links(seqs: Sequence[LeafSequence], share: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence: the longest prefix it shares with an EARLIER sequence of the same prompt, and
    which one (``-1``: none). Without ``share`` every sequence stands alone."""
    lcp = np.zeros(len(seqs), dtype=np.int64)
    parent = np.full(len(seqs), -1, dtype=np.int64)
    for bucket in _buckets(seqs, share):
        for n, i in enumerate(bucket):
            for j in bucket[:n]:
                k = _lcp(seqs[i].token_ids, seqs[j].token_ids)
                if k > lcp[i]:
                    lcp[i], parent[i] = k, j
    return lcp, parent


# ---------------------------------------------------------------------------------- planning
def _units(seqs: Sequence[LeafSequence], budget: int, share: bool) -> list[tuple[int, list[int]]]:
    """(computed tokens, indices) per prefix tree; a tree over the budget is cut into leaf chunks."""
    units = []
    for bucket in _buckets(seqs, share):
        chunk: list[int] = []
        cost = 0
        for i in bucket:
            ids = seqs[i].token_ids
            new = len(ids) - max((_lcp(ids, seqs[j].token_ids) for j in chunk), default=0)
            if chunk and cost + new > budget:
                units.append((cost, chunk))
                chunk, cost, new = [], 0, len(ids)
            chunk.append(i)
            cost += new
        units.append((cost, chunk))
    return units


def plan_micro_batches(seqs: Sequence[LeafSequence], budget: int, share: bool) -> list[list[int]]:
    """Index groups, each at most ``budget`` computed tokens (a unit over the budget goes alone):
    whole prefix trees (``share``) or sequences, first-fit by decreasing size."""
    units = _units(seqs, budget, share)
    units.sort(key=lambda u: -u[0])  # stable: the same data always gives the same grouping
    bins: list[tuple[int, list[int]]] = []
    for cost, idx in units:
        for b, (used, members) in enumerate(bins):
            if used + cost <= budget:
                bins[b] = (used + cost, members + idx)
                break
        else:
            bins.append((cost, list(idx)))
    return [sorted(members) for _, members in bins]


# ---------------------------------------------------------------------------------- layout
def _pair_fields(seqs, paths, current_version: int) -> dict[str, torch.Tensor]:
    """[leaves, longest response] tensors: logits row (src), target id, mask and per-token fields."""
    B, R = len(seqs), max(s.response_len for s in seqs)
    src = torch.zeros((B, R), dtype=torch.long)
    tgt = torch.zeros((B, R), dtype=torch.long)
    zeros = {k: torch.zeros((B, R)) for k in ("mask", "behavior_logprobs", "advantages", "staleness")}
    prox = torch.zeros((B, R)) if all(s.prox_logprobs_R is not None for s in seqs) else None
    ref = torch.zeros((B, R)) if all(s.ref_logprobs_R is not None for s in seqs) else None
    for b, (s, path) in enumerate(zip(seqs, paths)):
        n, p = len(s.token_ids), s.prompt_len
        r = n - p
        src[b, :r] = torch.from_numpy(path[p - 1 : n - 1])
        tgt[b, :r] = torch.from_numpy(s.token_ids[p:])
        zeros["mask"][b, :r] = torch.from_numpy(s.loss_weights_R)
        zeros["behavior_logprobs"][b, :r] = torch.from_numpy(s.behavior_logprobs_R)
        zeros["advantages"][b, :r] = s.advantage
        zeros["staleness"][b, :r] = torch.from_numpy(current_version - s.versions_R).float()
        if prox is not None:
            prox[b, :r] = torch.from_numpy(s.prox_logprobs_R)
        if ref is not None:
            ref[b, :r] = torch.from_numpy(s.ref_logprobs_R)
    out = {"src": src, "tgt": tgt, **zeros}
    if prox is not None:
        out["prox_logprobs"] = prox
    if ref is not None:
        out["ref_logprobs"] = ref
    return out


def pack(seqs: Sequence[LeafSequence], share: bool, current_version: int = 0) -> dict:
    """One packed row for ``seqs`` (``share``: prefixes shared, ``tree``; else concatenated, ``flat``).

    Returns ``input_ids``/``position_ids`` [1, T], ``layout`` (:class:`PackedLayout`), ``keep`` (the
    rows whose logits the loss needs), ``src`` (indices into ``keep``), ``tgt`` and the per-pair
    fields of :func:`learner.padded.collate` laid out [leaves, longest response].
    """
    if any(s.prompt_len < 1 or s.loss_tokens < 1 for s in seqs):
        raise ValueError("every packed sequence needs a prompt token and a trained (sampled) response token")
    lcp, parent = prefix_links(seqs, share=share)
    paths: list[np.ndarray] = []
    ids, pos, starts, ends, ancestors = [], [], [], [], []
    T = 0
    for i, s in enumerate(seqs):
        k, L = int(lcp[i]), len(s.token_ids)
        anc = paths[parent[i]][:k] if k else _EMPTY
        paths.append(np.concatenate([anc, np.arange(T, T + L - k, dtype=np.int64)]))
        if k < L:
            ids.append(s.token_ids[k:])
            pos.append(np.arange(k, L, dtype=np.int64))
            starts.append(T)
            ends.append(T + L - k)
            ancestors.append(anc)
            T += L - k
    out = _pair_fields(seqs, paths, current_version)
    valid = out["mask"].bool()  # trained targets: observation tokens need no logits
    keep = torch.unique(out["src"][valid])  # sorted; the rows whose logits are needed
    out["src"] = torch.searchsorted(keep, out["src"]).clamp(max=len(keep) - 1)
    out["keep"] = keep
    out["input_ids"] = torch.from_numpy(np.concatenate(ids)).long().unsqueeze(0)
    out["position_ids"] = torch.from_numpy(np.concatenate(pos)).unsqueeze(0)
    out["layout"] = PackedLayout(T, starts, ends, ancestors)
    return out


# ---------------------------------------------------------------------------------- packers
class _PackedRows:
    """A :class:`learner.packing.Packer` over packed rows; ``share`` tells ``tree`` from ``flat``."""

    mode: ClassVar[str]
    share: ClassVar[bool]

    def __init__(self, attention: str = "auto", pad_id: int = 0) -> None:
        self.attention = resolve_attention(attention)  # the back-end: "runs" or "mask"

    def prepare_model(self, module: torch.nn.Module) -> None:
        enable_packed_attention(module, self.attention)

    def plan(self, seqs: Sequence[LeafSequence], budget: int) -> list[list[int]]:
        return plan_micro_batches(seqs, budget, self.share)

    def collate(self, seqs: Sequence[LeafSequence], current_version: int = 0) -> dict:
        return pack(seqs, self.share, current_version)

    def forward(self, model: torch.nn.Module, module: torch.nn.Module, batch: dict, device: torch.device):
        """One forward over the packed row; logits [kept rows, vocab]: only at the rows that predict a
        response token, each computed once."""
        layout: PackedLayout = batch["layout"]
        out = model(
            input_ids=batch["input_ids"].to(device),
            position_ids=batch["position_ids"].to(device),
            logits_to_keep=batch["keep"].to(device),
            use_cache=False,
            **attention_inputs(layout, self.attention, module, device),
        )
        check_attention_ran(layout, self.attention, module)
        return out.logits[0]

    def logprobs(self, logits: torch.Tensor, batch: dict, entropy: bool = False):
        """The kept rows' logits gathered per (leaf, token) pair: [leaves, longest response]."""
        src, tgt = batch["src"].to(logits.device), batch["tgt"].to(logits.device)
        logp = logits[src, tgt] - torch.logsumexp(logits, dim=-1)[src]
        ent = entropy_from_logits(logits.detach())[src] if entropy else None
        return logp, ent

    def response_logprobs(self, logp: torch.Tensor, row: int, seq: LeafSequence) -> np.ndarray:
        lp = logp[row, : seq.response_len].numpy().astype(np.float32)
        return np.where(seq.loss_weights_R > 0, lp, np.float32(0.0))  # observations: no logits kept

    def computed_tokens(self, seqs: Sequence[LeafSequence]) -> int:
        lcp, _ = prefix_links(seqs, share=self.share)
        return int(sum(len(s.token_ids) for s in seqs) - lcp.sum())


class TreePacker(_PackedRows):
    """``learner.packing=tree``: each prompt's leaves as a prefix tree, shared tokens computed once."""

    mode = "tree"
    share = True


class FlatPacker(_PackedRows):
    """``learner.packing=flat``: the sequences concatenated into one row, no padding."""

    mode = "flat"
    share = False
