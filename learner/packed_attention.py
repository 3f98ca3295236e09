"""Attention along the runs of a packed row (``learner.packing`` ``tree`` and ``flat``).

A packed row (:mod:`learner.packed`) is a sequence of *runs*: run ``r`` is rows ``starts[r]:ends[r]``,
whose tokens attend to their ancestors' rows (the shared prefix, placed earlier) and causally to their
own run. :class:`PackedLayout` describes it; ``learner.packed_attention`` chooses how a forward honours
it:

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
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from common.config import PackedAttention
from common.errors import ConfigError, ModelError

ATTENTIONS = typing.get_args(PackedAttention)  # learner.packed_attention
RUNS_ATTENTION = "treepo_runs"
MAX_DENSE_TOKENS_GPU = 8192
GROUP_WASTE = 1.25  # a group's padded attention pairs may exceed its real ones by this factor


# ---------------------------------------------------------------------------------- layout
@dataclass
class _RunGroup:
    """Runs attended in one call: queries ``q_idx`` [m, n] over keys ``kv_idx`` [m, kv] (ancestors,
    then the run itself), ``mask`` [m, 1, n, kv] (None: equal-length runs without ancestors, causal)."""

    q_idx: torch.Tensor
    kv_idx: torch.Tensor
    mask: torch.Tensor | None


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


def enable_packed_attention(module, backend: str) -> None:
    """Prepare a HF causal LM for packed forwards with ``backend`` (``runs`` or ``mask``, see
    :func:`resolve_attention`).

    ``runs`` installs :func:`runs_attention` as the model's attention implementation (it behaves as
    sdpa for ordinary padded forwards); ``mask`` needs the model's attention to be sdpa or eager.
    Refuses (ConfigError naming the fix) a model whose attention cannot take the packing.
    """
    name = type(module).__name__
    current = getattr(module.config, "_attn_implementation", None)
    if backend == "mask":
        if current not in ("sdpa", "eager"):
            raise ConfigError(
                f"{name} uses {current!r} attention, which takes no custom 4-D mask: set "
                "learner.packed_attention=runs or learner.packing=none"
            )
        return
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


def attention_inputs(layout: PackedLayout, backend: str, module, device: torch.device) -> dict:
    """The model keyword arguments that make a forward attend along ``layout``."""
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


def check_attention_ran(layout: PackedLayout, backend: str, module) -> None:
    """ModelError if a ``runs`` forward never reached :func:`runs_attention` (the layout was ignored)."""
    if backend == "runs" and layout.calls.n == 0:
        raise ModelError(
            f"{type(module).__name__} ignored the packed layout (its attention never saw it): set "
            "learner.packing=none"
        )
