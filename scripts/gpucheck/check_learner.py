"""``learner``: ``LearnerRank`` with ``learner.fsdp=true learner.mixed_precision=bf16`` in a process group
of one (NCCL on GPU, gloo in the smoke run) on the model ``setup`` wrote, with synthetic trees whose
micro-batches of ``micro_batch_tokens`` (GPU: 8192) number at least two under every packing.

1. Log-probs: the learner's ``compute_logprobs`` with ``learner.packing=tree`` (the ``runs`` attention)
   against ``packing=none`` (one padded row per leaf, the model's own attention) on the same weights:
   every response token, mean and max absolute difference, beside the log-probs' own spread.
2. Training: ``steps`` optimizer steps with tree packing: finite loss and gradient norm, every step
   taken, watched weights moved by every step, matmuls in bf16, response tokens/s (after the first).
3. Memory: the peak allocated during training against ``common/plan.py``'s learner rank for this model
   and config (its parts without the CUDA context, which torch's allocator does not see).
4. ``weights_for_sync``: one full pass (the FSDP2 gather the weight broadcast reads).
"""

from __future__ import annotations

import contextlib
import math
import time

from gpucheck.base import HOST, Context, Skip, free_port, gib, local_tensor, log, peak_memory_gib, sync

NAME = "learner"
BUDGET_S = 90
NEEDS_MODEL = True
ABOUT = "FSDP2 bf16 learner: tree-packed log-probs vs packing=none (>=2 micro-batches), steps, peak vs plan"

# |tree - none| allowed on response log-probs (nats), by compute: (mean, max)
LOGPROB_TOLERANCE = {"bf16": (0.03, 0.5), "none": (1e-5, 1e-3)}
PLAN_SLACK = 1.10  # measured peak / planned peak above this: the plan under-counts


def learner_config(sz, gpu: bool):
    from common.config import LearnerConfig

    return LearnerConfig(
        num_workers=1,
        gpus_per_worker=1 if gpu else 0,
        prompts_per_step=sz.prompts,
        mini_batch_prompts=sz.prompts,
        micro_batch_tokens=sz.micro_batch_tokens,
        fsdp=True,
        mixed_precision="bf16",
        lr=1e-4,
        warmup_steps=1,
    )


def planned_learner(model_dir, lcfg, algo) -> dict:
    """common/plan.py's learner-rank figures for this model and config (GiB); ``torch_gib`` leaves out the
    CUDA context, which torch.cuda.max_memory_allocated does not see."""
    from common.config import ModelConfig, TrainConfig
    from common.plan import GIB, learner_side, model_arch

    cfg = TrainConfig()
    cfg.model, cfg.learner, cfg.algo = ModelConfig(path=str(model_dir), dtype="bfloat16"), lcfg, algo
    arch = model_arch(cfg.model)
    side = learner_side(cfg, arch, arch.params())
    parts = {k: round(v / GIB, 3) for k, v in side.parts.items()}
    return {
        "parts_gib": parts,
        "torch_gib": round(sum(v for k, v in parts.items() if k != "cuda_context"), 3),
    }


def _sequences(sz, vocab: int, seed: int):
    from common.config import AlgoConfig
    from learner.advantages import tree_advantages
    from learner.batching import leaf_sequences
    from learner.synthetic import synthetic_trees

    trees = synthetic_trees(
        sz.prompts,
        w=sz.leaves,
        depth=sz.depth,
        seg_len=sz.seg_len,
        prompt_len=sz.prompt_len,
        vocab_size=vocab,
        seed=seed,
    )
    return leaf_sequences(trees, tree_advantages(trees, AlgoConfig()))


def compare_logprobs(rank, seqs, gpu: bool) -> dict:
    """The rank's log-probs of ``seqs`` with its own (tree) packer, then with packing=none."""
    import numpy as np

    from learner.packing import make_packer

    tree_packer = rank.packer
    none_packer = make_packer("none", rank.cfg.packed_attention, int(rank.module.config.pad_token_id or 0))
    budget = rank.cfg.micro_batch_tokens
    counts = {"tree": len(tree_packer.plan(seqs, budget)), "none": len(none_packer.plan(seqs, budget))}
    sync(gpu)
    t0 = time.perf_counter()
    tree = rank.compute_logprobs(seqs)
    sync(gpu)
    t_tree = time.perf_counter() - t0
    rank.packer = none_packer
    try:
        t0 = time.perf_counter()
        none = rank.compute_logprobs(seqs)
        sync(gpu)
        t_none = time.perf_counter() - t0
    finally:
        rank.packer = tree_packer
    a, b = np.concatenate(tree), np.concatenate(none)
    diff = np.abs(a - b)
    return {
        "micro_batches": counts,
        "response_tokens": int(a.size),
        "computed_tokens": {
            "tree": tree_packer.computed_tokens(seqs),
            "none": none_packer.computed_tokens(seqs),
        },
        "mean_abs_diff": float(diff.mean()),
        "max_abs_diff": float(diff.max()),
        "logprob_mean": float(a.mean()),
        "logprob_std": float(a.std()),
        "seconds": {"tree": round(t_tree, 3), "none": round(t_none, 3)},
    }


def _logprob_problems(cmp: dict, precision: str) -> list[str]:
    mean_tol, max_tol = LOGPROB_TOLERANCE[precision]
    problems = []
    if min(cmp["micro_batches"].values()) < 2:
        problems.append(
            f"fewer than two micro-batches {cmp['micro_batches']}: accumulation is not on the path"
        )
    if not (cmp["mean_abs_diff"] <= mean_tol and cmp["max_abs_diff"] <= max_tol):
        problems.append(
            f"tree-packed log-probs differ from packing=none: mean |diff| {cmp['mean_abs_diff']:.3g} (limit "
            f"{mean_tol:g}), max {cmp['max_abs_diff']:.3g} (limit {max_tol:g}); log-prob spread {cmp['logprob_std']:.3g}"
        )
    return problems


def _watch(rank) -> list[str]:
    layers = rank.module.config.num_hidden_layers
    return [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        f"model.layers.{layers - 1}.mlp.down_proj.weight",
        "model.norm.weight",
    ]


def _snapshot(rank, names: list[str]) -> dict:
    """Copies of this rank's shard of the named parameters, looked up now: the parameter objects a
    module holds change (FSDP2 registers the unsharded ones between a no-grad forward and the next
    reshard, and frees them then)."""
    params = dict(rank.module.named_parameters())
    return {n: local_tensor(params[n]) for n in names}


def train_steps(rank, sz, gpu: bool, vocab: int, problems: list[str]) -> tuple[list[dict], float, int]:
    """``sz.steps`` optimizer steps; the per-step records, timed seconds and timed response tokens."""
    watch = _watch(rank)
    before = _snapshot(rank, watch)
    steps, timed_s, timed_tokens = [], 0.0, 0
    for step in range(sz.steps):
        seqs = _sequences(sz, vocab, seed=100 + step)
        tokens = sum(s.response_len for s in seqs)
        sync(gpu)
        t0 = time.perf_counter()
        rank.train_on([seqs])
        sync(gpu)
        dt = time.perf_counter() - t0
        after = _snapshot(rank, watch)
        moved = {n: float((after[n].float() - before[n].float()).abs().max()) for n in watch}
        info = dict(
            rank.last_step, step=step, seconds=round(dt, 3), response_tokens=tokens, version=rank.version
        )
        info["sequence_tokens"] = sum(len(s.token_ids) for s in seqs)
        info["max_abs_weight_change"] = {n: f"{v:.3g}" for n, v in moved.items()}
        steps.append(info)
        log(
            f"learner: step {step + 1}/{sz.steps} loss {info['learner/loss']:.4f} {dt:.2f} s ({tokens} response tokens)"
        )
        if not (math.isfinite(info["learner/loss"]) and math.isfinite(info["learner/grad_norm"])):
            problems.append(f"step {step}: loss/grad norm not finite")
        if rank.version != step + 1:
            problems.append(f"step {step}: refused (version {rank.version}, skipped {rank.skipped_steps})")
        unchanged = [n for n, v in moved.items() if not v > 0.0]
        if unchanged:
            problems.append(f"step {step}: weights did not change (or not finite): {unchanged}")
        if step > 0:  # the first step pays for allocator warm-up and kernel selection
            timed_s, timed_tokens = timed_s + dt, timed_tokens + tokens
        before = after
    return steps, timed_s, timed_tokens


def sync_pass(rank, gpu: bool, problems: list[str]) -> dict:
    """One full weights_for_sync pass: tensors, bytes, dtypes, seconds."""
    sync(gpu)
    t0 = time.perf_counter()
    n, size, names, dtypes = 0, 0, set(), set()
    for name, t in rank.weights_for_sync():
        n, size = n + 1, size + t.numel() * t.element_size()
        names.add(name)
        dtypes.add(str(t.dtype))
    sync(gpu)
    if "lm_head.weight" not in names:
        problems.append("weights_for_sync does not name lm_head.weight (a tied head would go stale)")
    if dtypes != {"torch.bfloat16"}:
        problems.append(f"weights_for_sync sent {sorted(dtypes)}, not model.dtype bfloat16")
    return {
        "tensors": n,
        "gib": gib(size),
        "dtypes": sorted(dtypes),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _open_rank(ctx: Context, lcfg, algo):
    from common.config import ModelConfig
    from learner.rank import LearnerRank

    # fp32 master weights (learner.param_dtype), bf16 compute, bf16 to engines (model.dtype)
    model_cfg = ModelConfig(path=str(ctx.model_dir), dtype="bfloat16")
    init = f"tcp://{HOST}:{free_port()}"
    return LearnerRank(model_cfg, algo, lcfg, rank=0, world_size=1, init_method=init, timeout_s=120)


def _compute_dtypes(rank):
    """A forward hook on the first q_proj recording the dtype matmuls run in; (set, handle)."""
    seen: set[str] = set()
    hook = rank.module.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda _m, _i, out: seen.add(str(out.dtype))
    )
    return seen, hook


def _sharding(rank, params: dict, problems: list[str]) -> tuple[str, str | None, list[str]]:
    """The decoder weights' type (FSDP2: DTensor), the mixed-precision policy's dtype (FSDP2's private
    state: None when unreadable) and the master weights' dtypes."""
    param_type = type(params[_watch(rank)[1]]).__name__
    if param_type != "DTensor":
        problems.append(
            f"the decoder weights are {param_type}s, not FSDP2 DTensors: the model was not sharded"
        )
    mp_policy = None
    with contextlib.suppress(AttributeError):
        mp_policy = str(rank.module._get_fsdp_state()._mp_policy.param_dtype)
    master = sorted({str(p.dtype) for p in params.values()})
    if master != ["torch.float32"]:
        problems.append(f"master weights are {master}, not float32")
    return param_type, mp_policy, master


def run(ctx: Context) -> dict:
    import torch

    from common.config import AlgoConfig

    if ctx.gpu and not torch.cuda.is_available():
        raise Skip("CUDA is not available")
    sz, gpu = ctx.sz, ctx.gpu
    lcfg, algo = learner_config(sz, gpu), AlgoConfig()
    t0 = time.perf_counter()
    rank = _open_rank(ctx, lcfg, algo)
    try:
        load_s = time.perf_counter() - t0
        problems: list[str] = []
        vocab = int(rank.module.config.vocab_size)
        cmp = compare_logprobs(rank, _sequences(sz, vocab, seed=0), gpu)
        rank.module.reshard()  # FSDP2 keeps the root unsharded after a no-grad forward
        problems += _logprob_problems(cmp, lcfg.mixed_precision)
        log(
            f"learner: log-probs tree vs none: mean |diff| {cmp['mean_abs_diff']:.3g}, max {cmp['max_abs_diff']:.3g}"
        )
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        compute_dtypes, hook = _compute_dtypes(rank)
        steps, timed_s, timed_tokens = train_steps(rank, sz, gpu, vocab, problems)
        hook.remove()
        if compute_dtypes != {"torch.bfloat16"}:
            problems.append(f"decoder matmuls ran in {sorted(compute_dtypes)}, not bf16 only")
        mem = peak_memory_gib(gpu)
        planned = planned_learner(ctx.model_dir, lcfg, algo)
        ratio = mem["peak_allocated_gib"] / planned["torch_gib"] if gpu else None
        if ratio is not None and ratio > PLAN_SLACK:
            problems.append(
                f"peak allocated {mem['peak_allocated_gib']} GiB is {ratio:.2f}x the plan's {planned['torch_gib']} GiB (limit {PLAN_SLACK}x)"
            )
        wsync = sync_pass(rank, gpu, problems)
        params = dict(rank.module.named_parameters())
        param_type, mp_policy, master = _sharding(rank, params, problems)
        tokens_per_s = timed_tokens / timed_s if timed_s else float("nan")
        peak = mem.get("peak_allocated_gib", mem.get("peak_rss_gib"))
        return {
            "process_group": torch.distributed.get_backend(),
            "device": str(rank.device),
            "params": sum(p.numel() for p in params.values()),
            "param_type": param_type,
            "mp_param_dtype": mp_policy,
            "compute_dtypes": sorted(compute_dtypes),
            "master_dtypes": master,
            "load_and_shard_s": round(load_s, 2),
            "micro_batch_tokens": sz.micro_batch_tokens,
            "logprobs_tree_vs_none": cmp,
            "steps": steps,
            "response_tokens_per_step": steps[-1]["response_tokens"],
            "tokens_per_s": round(tokens_per_s, 1),
            "plan": planned,
            "peak_over_plan": None if ratio is None else round(ratio, 3),
            "weights_for_sync": wsync,
            **mem,
            "summary": (
                f"log-probs tree vs none: mean |diff| {cmp['mean_abs_diff']:.2g}, max {cmp['max_abs_diff']:.2g} over "
                f"{cmp['micro_batches']} micro-batches; {tokens_per_s:.0f} response tok/s; peak {peak} GiB"
                + (f" = {ratio:.2f}x plan" if ratio is not None else "")
            ),
            "problems": problems,
        }
    finally:
        rank.close()
