"""Padding-free and tree-packed micro-batches: every distinct token runs through the model once.

``learner.packing`` chooses how leaf sequences (:class:`learner.batching.LeafSequence`) become model
inputs:

- ``none``: one right-padded row per leaf (:func:`learner.batching.collate`); a token shared by k
  leaves is computed k times, and every row is padded to the longest of its micro-batch.
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
sequence order, so a token's ancestors always precede it.

Loss. The model's logits are computed once per distinct token; the loss is then taken over the
(leaf, token) pairs exactly as in the padded path: ``src[b, t]`` is the packed row index of the token
that predicts leaf ``b``'s response token ``t`` and ``tgt[b, t]`` that token's id, so
``logp[b, t] = logits[src] [tgt] - logsumexp(logits[src])``. The per-pair tensors (behavior, π_prox,
reference logprobs, advantages, staleness) are laid out ``[leaves, longest response]`` like the
padded path's, so :func:`learner.loss.policy_loss` runs unchanged: PPO clip, dual clip, every
importance-weight variant (also the per-sequence ones), the token-mean normaliser and every metric
are exact. Backpropagating through the gather sums, for a shared token, the gradients of all leaves
through it -- for PPO clipping this equals taking the clipped term per distinct token with the leaves
split by the sign of their advantage (the ratio is shared), without writing that case out. The
scalar work is per pair (cheap); the model's work is per distinct token.

Attention (``learner.packed_attention``):

- ``runs`` (``auto``): a registered transformers attention function (:data:`RUNS_ATTENTION`) that
  attends each run's queries to its ancestors' and its own keys with ``scaled_dot_product_attention``;
  runs of similar size are batched into one call (padded, at most :data:`GROUP_WASTE` times the real
  query/key pairs): no T x T mask and little work on masked pairs, on CPU and GPU alike (GPU:
  untested here; no FlexAttention back-end is offered). Outside a packed
  forward it is the model's sdpa attention (padded rows keep working).
- ``mask``: the model's own sdpa or eager attention with a dense 4-D mask (boolean for sdpa,
  additive for eager; transformers passes a 4-D mask through unchanged). Exact, but O(T^2) memory
  and compute, including the masked pairs: a reference, refused on GPU for packs over
  :data:`MAX_DENSE_TOKENS_GPU` tokens.

Micro-batches hold whole prefix trees (or, when a tree exceeds ``micro_batch_tokens``, chunks of its
leaves) up to ``micro_batch_tokens`` *computed* tokens, first-fit by decreasing size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import ConfigError, ModelError
from learner.batching import LeafSequence

PACKINGS = ("tree", "flat", "none")
ATTENTIONS = ("auto", "runs", "mask")
RUNS_ATTENTION = "treepo_runs"
MAX_DENSE_TOKENS_GPU = 8192
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


def computed_tokens(seqs: Sequence[LeafSequence], packing: str) -> int:
    """Model positions a micro-batch of ``seqs`` runs under ``packing`` (padding included)."""
    lengths = [len(s.token_ids) for s in seqs]
    if packing == "none":
        return len(lengths) * max(lengths, default=0)
    if packing == "flat":
        return sum(lengths)
    lcp, _ = prefix_links(seqs, share=True)
    return int(sum(lengths) - lcp.sum())


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


def plan_micro_batches(seqs: Sequence[LeafSequence], budget: int, packing: str) -> list[list[int]]:
    """Index groups, each at most ``budget`` computed tokens (a unit over the budget goes alone):
    whole prefix trees (``tree``) or sequences (``flat``), first-fit by decreasing size."""
    units = _units(seqs, budget, share=packing == "tree")
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
@dataclass
class _RunGroup:
    """Runs attended in one call: queries ``q_idx`` [m, n] over keys ``kv_idx`` [m, kv] (ancestors,
    then the run itself), ``mask`` [m, 1, n, kv] (None: equal-length runs without ancestors, causal)."""

    q_idx: torch.Tensor
    kv_idx: torch.Tensor
    mask: torch.Tensor | None


GROUP_WASTE = 1.25  # a group's padded attention pairs may exceed its real ones by this factor


def _group_members(sizes: list[tuple[int, int]]) -> list[list[int]]:
    """Runs (n, ancestors) grouped greedily, largest key length first, while padding stays small."""
    order = sorted(range(len(sizes)), key=lambda r: (-(sizes[r][0] + sizes[r][1]), -sizes[r][0]))
    groups: list[list[int]] = []
    real = n_max = kv_max = 0
    for r in order:
        n, kv = sizes[r][0], sizes[r][0] + sizes[r][1]
        if groups:
            padded = (len(groups[-1]) + 1) * max(n_max, n) * max(kv_max, kv)
            if padded <= GROUP_WASTE * (real + n * kv):
                groups[-1].append(r)
                real, n_max, kv_max = real + n * kv, max(n_max, n), max(kv_max, kv)
                continue
        groups.append([r])
        real, n_max, kv_max = n * kv, n, kv
    return groups


def _group_runs(starts, ends, ancestors, device) -> tuple[list[_RunGroup], torch.Tensor]:
    sizes = [(b - a, len(anc)) for a, b, anc in zip(starts, ends, ancestors)]
    out_idx = torch.zeros(ends[-1] if ends else 0, dtype=torch.long)
    groups, offset = [], 0
    for members in _group_members(sizes):
        n_max = max(sizes[r][0] for r in members)
        kv_max = max(sizes[r][0] + sizes[r][1] for r in members)
        m = len(members)
        q_idx = torch.zeros((m, n_max), dtype=torch.long)
        kv_idx = torch.zeros((m, kv_max), dtype=torch.long)
        mask = torch.zeros((m, 1, n_max, kv_max), dtype=torch.bool)
        mask[:, :, :, 0] = True  # padding queries attend somewhere (no NaN); their output is dropped
        for slot, r in enumerate(members):
            a, b, anc = starts[r], ends[r], ancestors[r]
            n, k = b - a, len(anc)
            own = torch.arange(a, b)
            q_idx[slot, :n] = own
            kv_idx[slot, :k] = torch.from_numpy(anc)
            kv_idx[slot, k : k + n] = own
            mask[slot, 0, :n, :k] = True
            mask[slot, 0, :n, k : k + n] = torch.ones((n, n), dtype=torch.bool).tril()
            out_idx[a:b] = offset + slot * n_max + torch.arange(n)
        causal = all(sizes[r] == (n_max, 0) for r in members)
        groups.append(_RunGroup(q_idx.to(device), kv_idx.to(device), None if causal else mask.to(device)))
        offset += m * n_max
    return groups, out_idx.to(device)


class _Counter:
    n = 0


@dataclass
class PackedLayout:
    """Runs of one packed row: run ``r`` is rows ``starts[r]:ends[r]`` with ancestors ``ancestors[r]``."""

    length: int
    starts: list[int]
    ends: list[int]
    ancestors: list[np.ndarray]
    # attention calls served (a check that the packed attention really ran); a shared cell, since
    # FSDP2's input casting hands the forward a copy of the layout (dataclasses.replace,
    # lists and dicts rebuilt), which keeps a plain object as it is
    calls: _Counter = field(default_factory=_Counter)
    _device_cache: dict = field(default_factory=dict, repr=False)

    def groups(self, device: torch.device) -> tuple[list[_RunGroup], torch.Tensor]:
        """The runs batched into groups (one attention call each) and, per packed row, its place in
        the groups' concatenated, flattened query slots. Cached per device."""
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = _group_runs(self.starts, self.ends, self.ancestors, device)
        return self._device_cache[key]

    def dense_mask(self) -> torch.Tensor:
        """[T, T] boolean: query row q may attend to key column k (its root path, itself included)."""
        m = torch.zeros((self.length, self.length), dtype=torch.bool)
        for a, b, anc in zip(self.starts, self.ends, self.ancestors):
            n = b - a
            if len(anc):
                m[a:b, torch.from_numpy(anc)] = True
            m[a:b, a:b] = torch.ones((n, n), dtype=torch.bool).tril()
        return m


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
        zeros["mask"][b, :r] = 1.0
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


def pack(seqs: Sequence[LeafSequence], packing: str, current_version: int = 0) -> dict:
    """One packed row for ``seqs`` (``tree``: prefixes shared; ``flat``: concatenated).

    Returns ``input_ids``/``position_ids`` [1, T], ``layout`` (:class:`PackedLayout`), ``keep`` (the
    rows whose logits the loss needs), ``src`` (indices into ``keep``), ``tgt`` and the per-pair
    fields of :func:`learner.batching.collate` laid out [leaves, longest response].
    """
    if packing not in ("tree", "flat"):
        raise ConfigError(f"packing={packing!r}: pack() takes 'tree' or 'flat'")
    if any(s.prompt_len < 1 or s.response_len < 1 for s in seqs):
        raise ValueError("every packed sequence needs a prompt token and a response token")
    lcp, parent = prefix_links(seqs, share=packing == "tree")
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
    valid = out["mask"].bool()
    keep = torch.unique(out["src"][valid])  # sorted; the rows whose logits are needed
    out["src"] = torch.searchsorted(keep, out["src"]).clamp(max=len(keep) - 1)
    out["keep"] = keep
    out["input_ids"] = torch.from_numpy(np.concatenate(ids)).long().unsqueeze(0)
    out["position_ids"] = torch.from_numpy(np.concatenate(pos)).unsqueeze(0)
    out["layout"] = PackedLayout(T, starts, ends, ancestors)
    return out


# ---------------------------------------------------------------------------------- attention
def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[1, H, T, D] rows ``idx`` [m, n] as [m, H, n, D] (index_select: its backward is an index_add)."""
    m, n = idx.shape
    return x[0].index_select(1, idx.flatten()).view(x.shape[1], m, n, x.shape[3]).transpose(0, 1)


def runs_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: per-run attention when a packed ``treepo_layout`` is passed,
    the model's sdpa attention otherwise. query [B, H, T, D], key/value [B, Hkv, T, D]."""
    layout: PackedLayout | None = kwargs.pop("treepo_layout", None)
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    layout.calls.n += 1
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    groups, out_idx = layout.groups(query.device)
    outs = []
    for g in groups:  # [1, H, T, D] -> [m, H, n, D] queries and [m, Hkv, kv, D] keys/values
        q = _rows(query, g.q_idx)
        k, v = _rows(key, g.kv_idx), _rows(value, g.kv_idx)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=g.mask, dropout_p=p, is_causal=g.mask is None, scale=scaling, enable_gqa=gqa
        )
        outs.append(o.transpose(0, 1).flatten(1, 2))  # [H, m * n, D]
    out = (torch.cat(outs, 1) if len(outs) > 1 else outs[0]).index_select(1, out_idx)  # [H, T, D]
    return out.unsqueeze(0).transpose(1, 2).contiguous(), None


def resolve_attention(choice: str) -> str:
    if choice not in ATTENTIONS:
        raise ConfigError(f"learner.packed_attention={choice!r} is not one of {ATTENTIONS}")
    return "runs" if choice == "auto" else choice


def enable_packed_attention(module, packing: str, attention: str) -> str:
    """Prepare a HF causal LM for packed forwards; returns the attention back-end in use.

    ``runs`` installs :func:`runs_attention` as the model's attention implementation (it behaves as
    sdpa for ordinary padded forwards); ``mask`` needs the model's attention to be sdpa or eager.
    Refuses (ConfigError naming the fix) a model whose attention cannot take the packing.
    """
    if packing == "none":
        return "none"
    if packing not in PACKINGS:
        raise ConfigError(f"learner.packing={packing!r} is not one of {PACKINGS}: set learner.packing")
    backend = resolve_attention(attention)
    name = type(module).__name__
    current = getattr(module.config, "_attn_implementation", None)
    if backend == "mask":
        if current not in ("sdpa", "eager"):
            raise ConfigError(
                f"{name} uses {current!r} attention, which takes no custom 4-D mask: set "
                "learner.packed_attention=runs or learner.packing=none"
            )
        return backend
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(RUNS_ATTENTION, runs_attention)
    AttentionMaskInterface.register(RUNS_ATTENTION, sdpa_mask)
    try:
        module.set_attn_implementation(RUNS_ATTENTION)
    except (AttributeError, ValueError) as exc:
        raise ConfigError(
            f"{name} cannot switch its attention implementation ({exc}): set learner.packing=none"
        ) from None
    if getattr(module.config, "_attn_implementation", None) != RUNS_ATTENTION:
        raise ConfigError(
            f"{name} does not use transformers' attention interface, so it cannot attend along packed "
            "runs: set learner.packing=none (or learner.packed_attention=mask if it takes 4-D masks)"
        )
    return backend


def attention_inputs(batch: dict, backend: str, module, device: torch.device) -> dict:
    """The model keyword arguments that make a forward attend along ``batch``'s packed layout."""
    layout: PackedLayout = batch["layout"]
    if backend == "runs":
        layout.calls.n = 0
        # a placeholder 4-D mask: transformers passes 4-D masks through as they are, so it builds no
        # T x T mask of its own (it would, from the position ids of a packed row); runs_attention
        # ignores it
        placeholder = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
        return {"treepo_layout": layout, "attention_mask": placeholder}
    if device.type == "cuda" and layout.length > MAX_DENSE_TOKENS_GPU:
        raise ConfigError(
            f"a packed micro-batch of {layout.length} tokens would need a dense {layout.length}^2 mask on "
            f"the GPU: set learner.packed_attention=runs (or micro_batch_tokens <= {MAX_DENSE_TOKENS_GPU})"
        )
    mask = layout.dense_mask().to(device)[None, None]
    if getattr(module.config, "_attn_implementation", None) == "eager":
        dtype = next(module.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return {"attention_mask": mask}


def check_attention_ran(batch: dict, backend: str, module) -> None:
    """ModelError if a ``runs`` forward never reached :func:`runs_attention` (the layout was ignored)."""
    if backend == "runs" and batch["layout"].calls.n == 0:
        raise ModelError(
            f"{type(module).__name__} ignored the packed layout (its attention never saw it): set "
            "learner.packing=none"
        )
