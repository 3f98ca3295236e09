"""``sampling``: ``TreeSampler`` over the transformers backend (``HFBackend``) on the model ``setup``
wrote, tree then flat mode on the same prompts and seeds with EOS ignored (the analytic case of
``treepo bench sampling``): decoded tokens must equal the analytic count in both modes; reports the
wall-clock ratio tree/flat. (The vLLM backend is not checked here: its wheel does not travel with a
small device call; ``treepo bench sampling`` runs it where vLLM is installed.)"""

from __future__ import annotations

import time

from gpucheck.base import Context, log, need_cuda, peak_memory_gib, sync

NAME = "sampling"
BUDGET_S = 40
NEEDS_MODEL = True
ABOUT = "tree vs flat sampling with the transformers backend: decoded tokens = analytic count"
KEYS = (
    "wall_s",
    "rollout/decoded_tokens",
    "analytic_decoded_tokens",
    "rollout/steps",
    "rollout/requests",
    "rollout/max_batch",
    "rollout/trajectories_per_s",
    "rollout/decoded_tokens_per_s",
    "rollout/prefill_tokens_computed",
)


def _backend(ctx: Context, sampling):
    from actors.backends import make_backend
    from common.config import GeneratorConfig

    return make_backend(
        "hf",
        str(ctx.model_dir),
        GeneratorConfig(backend="hf"),
        sampling,
        dtype=ctx.sz.s_dtype,
        eos_ids=[],  # EOS ignored: every path runs to Lmax, the analytic case
        seed=0,
        device=ctx.device,
        max_batch=ctx.sz.s_max_batch,
    )


def _tree_config(sz) -> dict:
    return dict(
        w=sz.s_w,
        d=sz.s_d,
        l=sz.s_l,
        b=sz.s_b,
        max_response_tokens=sz.s_d * sz.s_l,
        seed=0,
        root_divergence_min=sz.s_root,
        root_divergence_max=sz.s_root,
        repetition_check=False,
    )


def _check_trees(mode, trees, prompts, sz, block_size, problems) -> int:
    """The analytic decoded-token count of ``trees``; shape problems appended."""
    from actors.sampler import analytic_decoded_tokens

    lmax = sz.s_d * sz.s_l
    prompt_len = {pid: len(p) for pid, p in prompts}
    if sorted(t.prompt_id for t in trees) != sorted(prompt_len):
        problems.append(f"{mode}: {len(trees)} trees for {len(prompts)} prompts")
    want = 0
    for tree in trees:  # in the order they finished
        args = (sz.s_w, sz.s_d, sz.s_l, sz.s_b, sz.s_root, lmax, prompt_len[tree.prompt_id], block_size, True)
        t_tok, f_tok = analytic_decoded_tokens(*args)
        want += t_tok if mode == "tree" else f_tok
        if len(tree.leaves) != sz.s_w:
            problems.append(f"{mode}: tree {tree.tree_id} has {len(tree.leaves)} leaves, not {sz.s_w}")
        short = [leaf.length for leaf in tree.leaves if leaf.length != lmax]
        if short:
            problems.append(f"{mode}: tree {tree.tree_id} has leaves shorter than Lmax: {short}")
    return want


def run(ctx: Context) -> dict:
    import torch

    from actors.sampler import TreeSampler
    from common.config import SamplingConfig, TreeConfig
    from common.models import load_tokenizer
    from common.sampling_metrics import SamplingStats
    from common.tasks import generate

    need_cuda(ctx)
    sz, gpu = ctx.sz, ctx.gpu
    tok = load_tokenizer(str(ctx.model_dir))
    rows = generate("arith", 2 * sz.s_prompts, seed=0, split="eval")
    encoded = [(r["id"], tok.encode(r["prompt"], add_special_tokens=False)) for r in rows]
    warm, prompts = encoded[: sz.s_prompts], encoded[sz.s_prompts :]
    sampling = SamplingConfig()
    t0 = time.perf_counter()
    backend = _backend(ctx, sampling)
    load_s = time.perf_counter() - t0

    def sample(cfg, batch):
        stats = SamplingStats()
        sampler = TreeSampler(backend, cfg, sampling, [], tok.decode, stats=stats, require_eos=False)
        sync(gpu)
        ts = time.perf_counter()
        trees = list(sampler.run(batch, max_in_flight=len(batch)))
        sync(gpu)
        wall = time.perf_counter() - ts
        return dict(stats.as_dict(wall_s=wall), wall_s=round(wall, 3)), trees

    try:
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        base = _tree_config(sz)
        short = dict(base, l=min(8, sz.s_l), max_response_tokens=sz.s_d * min(8, sz.s_l))
        for mode in ("flat", "tree"):  # warm-up (kernels, allocator), not timed
            sample(TreeConfig(mode=mode, **short), warm)
        results, problems = {}, []
        for mode in ("tree", "flat"):
            res, trees = sample(TreeConfig(mode=mode, **base), prompts)
            want = _check_trees(mode, trees, prompts, sz, backend.block_size, problems)
            got = int(res["rollout/decoded_tokens"])
            if got != want:
                problems.append(f"{mode}: decoded {got} tokens, the analytic count is {want}")
            res["analytic_decoded_tokens"] = want
            results[mode] = res
            log(f"sampling: {mode} {res['wall_s']:.2f} s, {got} decoded tokens")
        tree, flat = results["tree"], results["flat"]
        wall_ratio = tree["wall_s"] / flat["wall_s"]
        decoded_ratio = tree["rollout/decoded_tokens"] / flat["rollout/decoded_tokens"]
        analytic_ratio = tree["analytic_decoded_tokens"] / flat["analytic_decoded_tokens"]
        return {
            "backend": "hf",
            "dtype": sz.s_dtype,
            "load_s": round(load_s, 2),
            "config": {k: base[k] for k in ("w", "d", "l", "b")}
            | {"prompts": sz.s_prompts, "max_batch": sz.s_max_batch},
            "tree": {k: tree[k] for k in KEYS},
            "flat": {k: flat[k] for k in KEYS},
            "wall_tree_over_flat": round(wall_ratio, 3),
            "decoded_tree_over_flat": round(decoded_ratio, 3),
            "analytic_tree_over_flat": round(analytic_ratio, 3),
            **peak_memory_gib(gpu),
            "summary": (
                f"wall tree/flat {wall_ratio:.3f} (decoded tokens {decoded_ratio:.3f}, analytic "
                f"{analytic_ratio:.3f}); tree {tree['wall_s']:.1f} s, flat {flat['wall_s']:.1f} s"
            ),
            "problems": problems,
        }
    finally:
        backend.close()
