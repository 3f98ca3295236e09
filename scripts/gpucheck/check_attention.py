"""``attention``: the ``runs`` packed attention (``learner.packed_attention=auto``) at the plan's head
shapes (GPU: Qwen2.5-7B's 28 query / 4 KV heads of dimension 128, bf16) on one tree-packed micro-batch
of ``attn_tokens`` tokens (GPU: 8192; a synthetic tree: a prompt and 22 segments over four levels).

Forward and backward against a float32 reference that attends with the layout's dense [T, T] mask (one
KV head's query group at a time); which SDPA kernel ran for each group of runs (read from the profiler:
flash, memory-efficient, cuDNN or the math fallback, which works in fp32 with O(heads * n * kv) memory);
the extra peak memory of one forward + backward over the inputs; forward and backward time."""

from __future__ import annotations

from collections import Counter

from gpucheck.base import Context, gib, log, need_cuda, rel_error, timed
from gpucheck.sizes import attention_shape

NAME = "attention"
BUDGET_S = 50
NEEDS_MODEL = False
ABOUT = "runs attention at 7B head shapes, 8192 tokens: fwd+bwd vs fp32 dense mask, kernel per group, peak"

# relative error (max |runs - reference| / max |reference|) allowed per tensor, by compute dtype
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}
EXTRA_PEAK_LIMIT_GIB = 4.0  # one layer's attention at 8192 tokens; the dense fp32 scores alone are 7.5
KERNELS = {  # profiler op -> SDPA kernel
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_efficient_attention": "mem_efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused (other)",
}


def tree_layout(tokens: int):
    """One synthetic tree packed as ``learner.packing=tree`` packs it (about ``tokens`` tokens):
    a prompt of tokens/8 and 22 segments (8 leaves, 4 levels)."""
    from common.config import AlgoConfig
    from learner.advantages import tree_advantages
    from learner.batching import leaf_sequences
    from learner.packed import pack
    from learner.synthetic import synthetic_trees

    prompt = tokens // 8
    seg = (tokens - prompt) // 22
    trees = synthetic_trees(1, w=8, depth=4, seg_len=seg, prompt_len=prompt, vocab_size=64, seed=0)
    seqs = leaf_sequences(trees, tree_advantages(trees, AlgoConfig()))
    return pack(seqs, share=True)["layout"]


def _inputs(shape: dict, tokens: int, dtype, device: str):
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    h, kv, d = shape["heads"], shape["kv_heads"], shape["head_dim"]

    def rnd(*s):
        return torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dtype)

    q, k, v = rnd(1, h, tokens, d), rnd(1, kv, tokens, d), rnd(1, kv, tokens, d)
    grad_out = rnd(1, tokens, h, d)  # runs_attention returns [B, T, H, D]
    return q, k, v, grad_out


def _runs(layout, q, k, v, grad_out):
    """One forward + backward of learner.packed_attention.runs_attention; (out, dq, dk, dv)."""
    import torch

    from learner.packed_attention import runs_attention

    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=q.device)  # the learner's placeholder
    module = torch.nn.Module()  # training mode; dropout 0
    out, _ = runs_attention(
        module, q, k, v, mask, dropout=0.0, scaling=q.shape[-1] ** -0.5, treepo_layout=layout
    )
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def _reference(layout, q, k, v, grad_out):
    """float32 attention with the dense mask, one KV head's query group at a time; (out, dq, dk, dv)."""
    import torch

    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    mask = layout.dense_mask().to(q.device)
    per = q.shape[1] // k.shape[1]
    outs = []
    for g in range(k.shape[1]):
        qs = q[:, g * per : (g + 1) * per]
        scores = (qs @ k[:, g : g + 1].transpose(-1, -2)) * q.shape[-1] ** -0.5
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        o = (probs @ v[:, g : g + 1]).transpose(1, 2)  # [1, T, per, D]
        o.backward(grad_out[:, :, g * per : (g + 1) * per].float())
        outs.append(o.detach())
        del scores, probs, o
    return torch.cat(outs, 2), q.grad, k.grad, v.grad


def _kernels(layout, q, k, v, grad_out) -> tuple[list[str], dict[str, int]]:
    """The SDPA kernel of every forward call in order, and the fused backward ops seen (counts)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _runs(layout, q, k, v, grad_out)
    events = sorted((e for e in prof.events() if e.name in KERNELS), key=lambda e: e.time_range.start)
    backward: dict[str, int] = {}
    for e in prof.events():
        base = e.name.removesuffix("_backward")
        if e.name.endswith("_backward") and base in KERNELS:
            backward[KERNELS[base]] = backward.get(KERNELS[base], 0) + 1
    return [KERNELS[e.name] for e in events], backward


def _groups(layout, device, shape: dict) -> list[dict]:
    """Each group of runs: runs, query and key lengths, masked or causal, the math kernel's fp32 scores."""
    found = getattr(layout, "groups", None)
    if found is None:
        return []
    groups, _ = found(device)
    out = []
    for grp in groups:
        m, n = (int(x) for x in grp.q_idx.shape)
        kv = int(grp.kv_idx.shape[1])
        scores = m * shape["heads"] * n * kv * 4
        out.append(
            {
                "runs": m,
                "queries": n,
                "keys": kv,
                "masked": grp.mask is not None,
                "math_scores_gib": gib(scores),
            }
        )
    return out


def _describe(layout, shape: dict, dtype, device) -> object:
    """learner.packed_attention.describe_kernels (the kernel the learner chooses per group and the bytes
    it adds), where the learner offers it (else None)."""
    import learner.packed_attention as pa

    describe = getattr(pa, "describe_kernels", None)
    if describe is None:
        return None
    try:
        return describe(layout, shape["heads"], shape["kv_heads"], shape["head_dim"], dtype, device)
    except Exception as e:  # reported beside the profiler's reading, not a failure of the check
        return f"{type(e).__name__}: {e}"


def run(ctx: Context) -> dict:
    import torch

    need_cuda(ctx)
    sz = ctx.sz
    shape = attention_shape(sz.attn_model)
    dtype = getattr(torch, sz.attn_dtype)
    layout = tree_layout(sz.attn_tokens)
    q, k, v, grad_out = _inputs(shape, layout.length, dtype, ctx.device)
    _runs(layout, q, k, v, grad_out)  # warm-up: kernel selection, allocator
    kernels, backward = _kernels(layout, q, k, v, grad_out)
    if ctx.gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if ctx.gpu else 0
    (out, dq, dk, dv), seconds = timed(ctx.gpu, _runs, layout, q, k, v, grad_out)
    extra = (torch.cuda.max_memory_allocated() - base) if ctx.gpu else 0
    ref = _reference(layout, q, k, v, grad_out)
    errors = {n: rel_error(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref)}
    tol = TOLERANCE[sz.attn_dtype]
    problems = [
        f"{n}: relative error {e:.2e} over {tol:g} against the fp32 dense-mask reference"
        for n, e in errors.items()
        if not e <= tol
    ]
    groups = _groups(layout, q.device, shape)
    for i, grp in enumerate(groups):
        grp["kernel"] = kernels[i] if len(kernels) == len(groups) else "?"
    if ctx.gpu and extra / 2**30 > EXTRA_PEAK_LIMIT_GIB:
        problems.append(
            f"one forward + backward took {gib(extra)} GiB over its inputs (limit {EXTRA_PEAK_LIMIT_GIB} GiB)"
        )
    masked = sorted({g["kernel"] for g in groups if g["masked"]})
    log(f"attention: {layout.length} tokens, {len(groups)} groups, kernels {dict(Counter(kernels))}")
    qkv = sum(t.numel() * t.element_size() for t in (q, k, v))
    return {
        "shape": shape,
        "dtype": sz.attn_dtype,
        "tokens": layout.length,
        "runs": len(layout.starts),
        "groups": groups,
        "forward_kernels": kernels,
        "backward_kernels": backward,
        "describe_kernels": _describe(layout, shape, dtype, q.device),
        "relative_errors": {n: float(f"{e:.3g}") for n, e in errors.items()},
        "tolerance": tol,
        "fwd_bwd_ms": round(seconds * 1e3, 2),
        "inputs_gib": gib(qkv),
        "extra_peak_gib": gib(extra),
        "summary": (
            f"{layout.length} tokens, {len(groups)} groups, masked groups on {masked or '-'}; max rel. error "
            f"{max(errors.values()):.1e}; fwd+bwd {seconds * 1e3:.1f} ms, extra peak {gib(extra)} GiB"
        ),
        "problems": problems,
    }
