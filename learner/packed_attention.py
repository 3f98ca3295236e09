"""Attention along the runs of a packed row (``learner.packing`` ``tree`` and ``flat``).

A packed row (:mod:`learner.packed`) is a sequence of *runs*: run ``r`` is rows ``starts[r]:ends[r]``,
whose tokens attend to their ancestors' rows (the shared prefix, placed earlier) and causally to their
own run. :class:`PackedLayout` describes it; ``learner.packed_attention`` chooses how a forward honours
it:

- ``runs`` (``auto``): a registered transformers attention function (:data:`RUNS_ATTENTION`) that
  attends each run's queries to its ancestors' and its own keys with ``scaled_dot_product_attention``;
  runs of similar size are batched into one call (padded, at most :data:`GROUP_WASTE` times the real
  query/key pairs): no T x T mask and little work on masked pairs, on CPU and GPU alike. The groups
  are built once per micro-batch, before the forward, and shared by the copies of the layout that
  FSDP2 hands each layer. On CUDA every group runs on a kernel chosen once per micro-batch from
  torch's own checks (:func:`choose_kernel`; :func:`describe_kernels` reports it): flash attention for
  the causal groups, the memory-efficient kernel for the masked ones (KV heads expanded where it takes
  no grouped-query heads), the math kernel only as a fallback said in the log. On CPU torch picks.
  Outside a packed forward it is the model's sdpa attention (padded rows keep working).
- ``mask``: the model's own sdpa or eager attention with a dense 4-D mask (boolean for sdpa,
  additive for eager; transformers passes a 4-D mask through unchanged). Exact, but O(T^2) memory
  and compute, including the masked pairs: a reference, refused on GPU for packs over
  :data:`MAX_DENSE_TOKENS_GPU` tokens.
"""

from __future__ import annotations

import contextlib
import logging
import typing
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from common.config import PackedAttention
from common.errors import ConfigError, ModelError

log = logging.getLogger(__name__)
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


def _runs_mask(n: torch.Tensor, k: torch.Tensor, n_max: int, kv_max: int, device) -> torch.Tensor:
    """[m, 1, n_max, kv_max] boolean mask of runs with ``n`` [m] own tokens after ``k`` [m] ancestors:
    query i of a run sees every ancestor and its own tokens 0..i; padding queries see key 0 only (no
    NaN; their output is dropped). Built on ``device`` with no loop."""
    n, k = n.to(device)[:, None, None], k.to(device)[:, None, None]
    i = torch.arange(n_max, device=device)[None, :, None]
    j = torch.arange(kv_max, device=device)[None, None, :]
    mask = (j - k <= i) & (i < n)  # ancestors: j - k < 0 <= i; own tokens: causal; padding: none
    mask[:, :, 0] = True
    return mask.unsqueeze(1)


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
        for slot, r in enumerate(members):
            a, b, anc = starts[r], ends[r], ancestors[r]
            n, k = b - a, len(anc)
            own = torch.arange(a, b)
            q_idx[slot, :n] = own
            kv_idx[slot, :k] = torch.from_numpy(anc)
            kv_idx[slot, k : k + n] = own
            out_idx[a:b] = offset + slot * n_max + torch.arange(n)
        causal = all(sizes[r] == (n_max, 0) for r in members)
        n_k = torch.tensor([sizes[r] for r in members], dtype=torch.long)
        mask = None if causal else _runs_mask(n_k[:, 0], n_k[:, 1], n_max, kv_max, device)
        groups.append(_RunGroup(q_idx.to(device), kv_idx.to(device), mask))
        offset += m * n_max
    return groups, out_idx.to(device)


class _Shared:
    """What every copy of one layout shares. FSDP2's input casting hands each wrapped layer a copy of
    its keyword arguments (dataclasses rebuilt with ``dataclasses.replace``, lists and dicts rebuilt),
    which keeps a plain object as it is: so the groups are built once per micro-batch, not per layer.

    ``calls``: attention calls served (a check that the packed attention really ran); ``groups``: per
    device, :func:`_group_runs`; ``kernels``: per device, dtype and head shape, the CUDA kernel of each
    group (:class:`GroupKernel`)."""

    def __init__(self) -> None:
        self.calls = 0
        self.groups: dict[str, tuple[list[_RunGroup], torch.Tensor]] = {}
        self.kernels: dict[tuple, GroupKernel] = {}


@dataclass
class PackedLayout:
    """Runs of one packed row: run ``r`` is rows ``starts[r]:ends[r]`` with ancestors ``ancestors[r]``."""

    length: int
    starts: list[int]
    ends: list[int]
    ancestors: list[np.ndarray]
    shared: _Shared = field(default_factory=_Shared, repr=False, compare=False)

    def groups(self, device: torch.device) -> tuple[list[_RunGroup], torch.Tensor]:
        """The runs batched into groups (one attention call each) and, per packed row, its place in
        the groups' concatenated, flattened query slots. Built once per device (shared by copies)."""
        key = str(device)
        if key not in self.shared.groups:
            self.shared.groups[key] = _group_runs(self.starts, self.ends, self.ancestors, device)
        return self.shared.groups[key]

    def dense_mask(self) -> torch.Tensor:
        """[T, T] boolean: query row q may attend to key column k (its root path, itself included)."""
        m = torch.zeros((self.length, self.length), dtype=torch.bool)
        for a, b, anc in zip(self.starts, self.ends, self.ancestors):
            n = b - a
            if len(anc):
                m[a:b, torch.from_numpy(anc)] = True
            m[a:b, a:b] = torch.ones((n, n), dtype=torch.bool).tril()
        return m


# ---------------------------------------------------------------------------------- CUDA kernels
# Which sdpa kernel a group runs on CUDA is decided, not left to torch's silent fallback: flash
# attention takes no mask (so only the causal groups without ancestors), the memory-efficient kernel
# takes masks but, depending on the torch build, not grouped-query heads (then the KV heads are
# expanded for it), cuDNN is not used (its mask and grouped-query support varies by version), and the
# math kernel (fp32 scores, O(heads x n x kv) memory) runs only where neither takes a group, said once
# in the log.
_FAST = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
_CAN_USE = {
    SDPBackend.FLASH_ATTENTION: can_use_flash_attention,
    SDPBackend.EFFICIENT_ATTENTION: can_use_efficient_attention,
}
MASK_ALIGN = 16  # mask rows padded to this many elements: the memory-efficient kernel takes them as they are
_SAID: set[str] = set()


@dataclass
class GroupKernel:
    """How one group attends on CUDA: ``backend`` (run alone, under ``sdpa_kernel``), ``expand_kv``
    (KV heads repeated to the query heads first) and ``mask`` (the group's mask as the kernel takes it:
    for the memory-efficient kernel an additive bias in the compute dtype, one tensor for every layer;
    None: causal)."""

    backend: SDPBackend
    expand_kv: bool
    mask: torch.Tensor | None


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[m, Hkv, kv, D] with each KV head repeated for its ``heads // Hkv`` query heads."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _probe(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``x`` with its heads expanded, outside autograd (only its shape and flags are looked at)."""
    return _expand(x.detach(), heads).requires_grad_(x.requires_grad)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean [m, 1, n, kv] as an additive bias in ``dtype`` (0 where allowed, -inf elsewhere), its
    rows padded in memory to :data:`MASK_ALIGN` elements so that sdpa uses it without copying."""
    m, _, n, kv = mask.shape
    bias = torch.full((m, 1, n, kv + (-kv % MASK_ALIGN)), float("-inf"), dtype=dtype, device=mask.device)
    return bias[..., :kv].masked_fill_(mask, 0.0)


def choose_kernel(q, k, v, mask, dropout: float = 0.0, can_use=None) -> tuple[SDPBackend, bool]:
    """(backend, expand_kv) for one group: the first of flash attention and memory-efficient attention
    that the installed torch accepts for these inputs (grouped-query heads as they are), then the
    memory-efficient kernel with the KV heads expanded; the math kernel where none does.
    ``can_use``: backend -> predicate on ``SDPAParams`` (default: torch's own checks)."""
    can_use = _CAN_USE if can_use is None else can_use
    gqa = q.shape[1] != k.shape[1]
    tries = [(b, False) for b in _FAST] + ([(SDPBackend.EFFICIENT_ATTENTION, True)] if gqa else [])
    for backend, expand in tries:
        kk, vv = (_probe(k, q.shape[1]), _probe(v, q.shape[1])) if expand else (k, v)
        if can_use[backend](SDPAParams(q, kk, vv, mask, dropout, mask is None, gqa and not expand), False):
            return backend, expand
    return SDPBackend.MATH, False


def _kernel_for(q, k, v, mask, dropout: float) -> GroupKernel:
    backend, expand = choose_kernel(q, k, v, mask, dropout)
    if backend == SDPBackend.MATH and "math" not in _SAID:
        _SAID.add("math")
        log.warning(
            "packed attention: no flash or memory-efficient sdpa kernel takes a group (queries %s, keys %s, "
            "%s, mask %s): it runs on the math kernel (fp32 scores, memory heads x queries x keys)",
            tuple(q.shape), tuple(k.shape), q.dtype, mask is not None,
        )  # fmt: skip
    if mask is not None and backend == SDPBackend.EFFICIENT_ATTENTION:
        mask = additive_mask(mask, q.dtype)
    return GroupKernel(backend, expand, mask)


def _group_kernel(shared: _Shared, i: int, g: _RunGroup, q, k, v, dropout: float) -> GroupKernel:
    """Group ``i``'s kernel, chosen at the first layer and kept for the micro-batch's other layers."""
    key = (i, str(q.device), q.dtype, q.shape[1], k.shape[1], q.shape[-1], q.requires_grad, dropout > 0)
    if key not in shared.kernels:
        shared.kernels[key] = _kernel_for(q, k, v, g.mask, dropout)
    return shared.kernels[key]


def describe_kernels(
    layout: PackedLayout,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    requires_grad: bool = True,
    dropout: float = 0.0,
) -> list[dict]:
    """Per group of ``layout``: the sdpa kernel its attention runs on for these head shapes, as torch
    dispatches it (CUDA: under the kernel :func:`choose_kernel` picks; CPU: torch's own choice), with
    the group's size and the bytes it adds (the mask as the kernel takes it, the expanded KV heads)."""
    device = torch.device(device)
    out = []
    for g in layout.groups(device)[0]:
        m, n = g.q_idx.shape
        kv = g.kv_idx.shape[1]
        q = torch.zeros((m, q_heads, n, head_dim), dtype=dtype, device=device, requires_grad=requires_grad)
        k = torch.zeros((m, kv_heads, kv, head_dim), dtype=dtype, device=device, requires_grad=requires_grad)
        kernel = _kernel_for(q, k, k, g.mask, dropout) if device.type == "cuda" else None
        mask = g.mask if kernel is None else kernel.mask
        if kernel is not None and kernel.expand_kv:
            k = _probe(k, q_heads)
        only = sdpa_kernel([kernel.backend]) if kernel is not None else contextlib.nullcontext()
        with only:
            chosen = torch._fused_sdp_choice(
                q, k, k, mask, dropout, g.mask is None, enable_gqa=q_heads != k.shape[1]
            )
        expanded = kernel is not None and kernel.expand_kv
        esize = torch.empty((), dtype=dtype).element_size()
        out.append(
            {
                "runs": m,
                "queries": n,
                "keys": kv,
                "masked": g.mask is not None,
                "backend": SDPBackend(chosen).name.lower(),
                "expand_kv": expanded,
                "mask_bytes": 0 if mask is None else mask.untyped_storage().nbytes(),
                "expanded_kv_bytes": 2 * m * (q_heads - kv_heads) * kv * head_dim * esize if expanded else 0,
            }
        )
    return out


# ---------------------------------------------------------------------------------- attention
def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[1, H, T, D] rows ``idx`` [m, n] as [m, H, n, D] (index_select: its backward is an index_add)."""
    m, n = idx.shape
    return x[0].index_select(1, idx.flatten()).view(x.shape[1], m, n, x.shape[3]).transpose(0, 1)


def attend(
    q, k, v, mask, kernel: GroupKernel | None = None, dropout: float = 0.0, scale=None
) -> torch.Tensor:
    """One group's attention: q [m, H, n, D] over k/v [m, Hkv, kv, D] with ``mask`` [m, 1, n, kv] (None:
    causal). ``kernel`` None: sdpa as torch picks it (CPU: its flash or math kernel), grouped-query
    heads as they are; else ``kernel.backend`` alone (on CUDA), the KV heads expanded when
    ``kernel.expand_kv``, with ``kernel.mask``."""
    if kernel is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )  # fmt: skip
    if kernel.expand_kv:
        k, v = _expand(k, q.shape[1]), _expand(v, q.shape[1])
    only = sdpa_kernel([kernel.backend]) if q.is_cuda else contextlib.nullcontext()
    with only:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=kernel.mask, dropout_p=dropout, is_causal=mask is None, scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )  # fmt: skip


def runs_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: per-run attention when a packed ``treepo_layout`` is passed,
    the model's sdpa attention otherwise. query [B, H, T, D], key/value [B, Hkv, T, D]. On CUDA each
    group runs on the kernel :func:`choose_kernel` picks for it (once per micro-batch)."""
    layout: PackedLayout | None = kwargs.pop("treepo_layout", None)
    if layout is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    layout.shared.calls += 1
    p = dropout if module.training else 0.0
    groups, out_idx = layout.groups(query.device)
    outs = []
    for i, g in enumerate(groups):  # [1, H, T, D] -> [m, H, n, D] queries and [m, Hkv, kv, D] keys/values
        q = _rows(query, g.q_idx)
        k, v = _rows(key, g.kv_idx), _rows(value, g.kv_idx)
        kernel = _group_kernel(layout.shared, i, g, q, k, v, p) if q.is_cuda else None
        o = attend(q, k, v, g.mask, kernel, p, scaling)
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
        layout.shared.calls = 0
        layout.groups(device)  # built here, once, before the layers see (copies of) the layout
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
    if backend == "runs" and layout.shared.calls == 0:
        raise ModelError(
            f"{type(module).__name__} ignored the packed layout (its attention never saw it): set "
            "learner.packing=none"
        )
