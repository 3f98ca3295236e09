"""The ``runs`` attention's kernel choice (learner/packed_attention.py): the KV-head expansion that
lets the memory-efficient kernel take masked grouped-query groups equals the grouped-query path, the
choice follows what each kernel accepts, the per-group kernel description is sane, and the copies of
a layout that FSDP2's input casting makes share its groups.

CUDA's own checks decide on a GPU (the device check runs :func:`describe_kernels` there); here the
kernels' refusals are injected into :func:`choose_kernel`, and the chosen path runs on CPU's sdpa.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
import torch
from torch.distributed.fsdp._fully_shard._fsdp_common import _cast_fp_tensor
from torch.distributed.utils import _apply_to_tensors
from torch.nn.attention import SDPBackend

import learner.packed_attention as pa
from learner.batching import LeafSequence
from learner.packed import pack
from learner.packed_attention import (
    MASK_ALIGN,
    GroupKernel,
    PackedLayout,
    additive_mask,
    attend,
    choose_kernel,
    describe_kernels,
    runs_attention,
)

H, HKV, D = 4, 2, 16


def _seq(tokens, prompt_len: int) -> LeafSequence:
    ids = np.asarray(tokens, dtype=np.int64)
    r = len(ids) - prompt_len
    zeros = np.zeros(r, dtype=np.float32)
    return LeafSequence(ids, prompt_len, zeros, np.zeros(r, dtype=np.int64), 0.0)


def _layout() -> PackedLayout:
    """Two prompts: 3 leaves sharing a prefix (groups with ancestors, masked) and 2 equal-length
    leaves of their own prompts (a causal group without a mask)."""
    rng = np.random.default_rng(0)
    prefix = list(rng.integers(4, 40, 9))
    seqs = [_seq(prefix + list(rng.integers(4, 40, n)), 5) for n in (7, 6, 8)]
    seqs += [_seq(list(rng.integers(4, 40, 10)), 4) for _ in range(2)]
    return pack(seqs, share=True)["layout"]


def _qkv(layout: PackedLayout, grad: bool = False):
    g = torch.Generator().manual_seed(1)
    q = torch.randn((1, H, layout.length, D), generator=g)
    k = torch.randn((1, HKV, layout.length, D), generator=g)
    v = torch.randn((1, HKV, layout.length, D), generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v)]


class _Module:
    training = False


def test_layout_has_masked_and_causal_groups():
    groups, _ = _layout().groups(torch.device("cpu"))
    assert any(g.mask is None for g in groups) and any(g.mask is not None for g in groups)


def _refuse(*refused):
    """Predicates for choose_kernel: the backends in ``refused`` take nothing; flash takes no mask;
    efficient takes a mask only with as many KV heads as query heads (older torch builds)."""

    def flash(params, debug):
        return SDPBackend.FLASH_ATTENTION not in refused and params.attn_mask is None

    def efficient(params, debug):
        if SDPBackend.EFFICIENT_ATTENTION in refused:
            return False
        return params.attn_mask is None or params.query.shape[1] == params.key.shape[1]

    return {SDPBackend.FLASH_ATTENTION: flash, SDPBackend.EFFICIENT_ATTENTION: efficient}


def test_choose_kernel_follows_what_the_kernels_take():
    layout = _layout()
    groups, _ = layout.groups(torch.device("cpu"))
    masked = next(g for g in groups if g.mask is not None)
    causal = next(g for g in groups if g.mask is None)
    q, k = torch.zeros((2, H, 5, D)), torch.zeros((2, HKV, 5, D))
    assert choose_kernel(q, k, k, None, can_use=_refuse()) == (SDPBackend.FLASH_ATTENTION, False)
    mask = masked.mask[:, :, :5, :5]
    assert choose_kernel(q, k, k, mask, can_use=_refuse()) == (SDPBackend.EFFICIENT_ATTENTION, True)
    kh = torch.zeros((2, H, 5, D))  # no grouped-query heads: nothing to expand
    assert choose_kernel(q, kh, kh, mask, can_use=_refuse()) == (SDPBackend.EFFICIENT_ATTENTION, False)
    both = _refuse(SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
    assert choose_kernel(q, k, k, mask, can_use=both) == (SDPBackend.MATH, False)
    assert causal.mask is None


def test_additive_mask_is_aligned_and_equal_to_the_boolean():
    mask = torch.rand((3, 1, 5, 21)) < 0.5
    bias = additive_mask(mask, torch.bfloat16)
    assert bias.shape == mask.shape and bias.dtype == torch.bfloat16
    assert bias.stride(-1) == 1 and all(s % MASK_ALIGN == 0 for s in bias.stride()[:-1])
    assert torch.equal(bias == 0, mask) and bool(torch.isinf(bias[~mask]).all())


def _assembled(layout, q, k, v, kernels):
    """The layout's attention with the given kernel per group (None: today's CPU path)."""
    groups, out_idx = layout.groups(q.device)
    outs = []
    for g, kernel in zip(groups, kernels):
        rows = [
            t[0].index_select(1, idx.flatten()) for t, idx in ((q, g.q_idx), (k, g.kv_idx), (v, g.kv_idx))
        ]
        qq, kk, vv = (
            r.view(r.shape[0], *idx.shape, D).transpose(0, 1)
            for r, idx in zip(rows, (g.q_idx, g.kv_idx, g.kv_idx))
        )
        outs.append(attend(qq, kk, vv, g.mask, kernel).transpose(0, 1).flatten(1, 2))
    return torch.cat(outs, 1).index_select(1, out_idx)


def test_kv_expansion_equals_the_grouped_query_path():
    """Each masked group on the memory-efficient plan (KV heads expanded, additive bias) gives what
    the grouped-query path gives, forward and backward, fp32; the grouped-query path is runs_attention."""
    layout = _layout()
    groups, _ = layout.groups(torch.device("cpu"))
    q, k, v = _qkv(layout, grad=True)
    plans = []
    for g in groups:  # each group's choice for its shapes, with an older torch's refusals
        (m, n), kv = g.q_idx.shape, g.kv_idx.shape[1]
        qq, kk = torch.zeros((m, H, n, D)), torch.zeros((m, HKV, kv, D))
        backend, expand = choose_kernel(qq, kk, kk, g.mask, can_use=_refuse())
        mask = None if g.mask is None else additive_mask(g.mask, torch.float32)
        plans.append(GroupKernel(backend, expand, mask))
    assert any(p.expand_kv for p in plans) and any(p.mask is None for p in plans)
    expanded = _assembled(layout, q, k, v, plans)
    gqa = _assembled(layout, q, k, v, [None] * len(groups))
    ref, _ = runs_attention(_Module(), q, k, v, None, treepo_layout=layout)
    assert torch.equal(gqa.unsqueeze(0).transpose(1, 2), ref)
    torch.testing.assert_close(expanded, gqa, rtol=1e-5, atol=1e-6)
    w = torch.randn(gqa.shape, generator=torch.Generator().manual_seed(2))
    g_exp = torch.autograd.grad((expanded * w).sum(), (q, k, v))
    g_gqa = torch.autograd.grad((gqa * w).sum(), (q, k, v))
    for a, b in zip(g_exp, g_gqa):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_describe_kernels_on_cpu(caplog):
    layout = _layout()
    groups, _ = layout.groups(torch.device("cpu"))
    with caplog.at_level(logging.WARNING):
        rows = describe_kernels(layout, 28, 4, 128, torch.bfloat16, "cpu")
    assert len(rows) == len(groups)
    assert sum(r["runs"] for r in rows) == len(layout.starts)
    for r, g in zip(rows, groups):
        assert (r["queries"], r["keys"]) == (g.q_idx.shape[1], g.kv_idx.shape[1])
        assert r["masked"] == (g.mask is not None) and r["keys"] >= r["queries"]
        assert r["backend"] in ("flash_attention", "math") and not r["expand_kv"]
        assert r["expanded_kv_bytes"] == 0
        assert r["mask_bytes"] == (0 if g.mask is None else g.mask.numel())
    assert not caplog.records


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runs_attention_on_cpu_takes_no_kernel_plan(dtype):
    """CPU keeps torch's own sdpa choice: no per-group kernel is recorded."""
    layout = _layout()
    q, k, v = (t.to(dtype) for t in _qkv(layout))
    runs_attention(_Module(), q, k, v, None, treepo_layout=layout)
    assert layout.shared.calls == 1 and not layout.shared.kernels


def test_copies_made_by_fsdp_input_casting_share_the_groups(monkeypatch):
    """FSDP2 casts a wrapped layer's keyword arguments with this walk, rebuilding dataclasses, lists
    and dicts; every copy of a layout builds nothing new once the groups exist."""
    built = []
    group_runs = pa._group_runs
    monkeypatch.setattr(pa, "_group_runs", lambda *a: built.append(1) or group_runs(*a))
    layout = _layout()
    cast = functools.partial(_cast_fp_tensor, torch.bfloat16)
    copies = [_apply_to_tensors(cast, {"treepo_layout": layout})["treepo_layout"] for _ in range(3)]
    assert all(c is not layout and c.shared is layout.shared for c in copies)
    first = copies[0].groups(torch.device("cpu"))
    assert all(c.groups(torch.device("cpu")) is first for c in copies[1:] + [layout])
    assert len(built) == 1
