"""``treepo bench sampling``: tree vs flat sampling on the same engine, model, prompts, ``w``, max
response length and seeds, in one run.

Both modes sample ``w`` trajectories per prompt of at most Lmax = d·l tokens; flat is ``w``
independent requests of Lmax tokens (GRPO), tree is the segment tree (d × l, branching b). By
default EOS is ignored, which is the analytic no-early-stop case: the tree then decodes exactly
``Σ_k n_k·len_k`` tokens per prompt (``n_k`` live paths at step k: r, min(b·r, w), …) against
``w·Lmax`` for flat, and the wall-clock ratio tree/flat is printed beside that bound. A warm-up of
both modes (excluded from timing) runs first; the prefix cache is reset before each timed mode.
The default model is a random-init tiny Qwen2 of size "s" built in a temp dir (seconds, offline).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from cluster.bench.report import emit_json, print_table, ratio
from common.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="random:s",
        help="'random:<xs|s|m>' (random-init tiny model in a temp dir), 'tiny:arith', or a model directory.",
    )
    parser.add_argument("--backend", default="vllm", choices=["vllm", "hf"], help="Generation backend.")
    parser.add_argument("--d", type=int, default=4, help="Segments per trajectory (tree depth).")
    parser.add_argument(
        "--l", type=int, default=64, help="Segment length in tokens (a multiple of --block-size)."
    )
    parser.add_argument("--b", type=int, default=2, help="Branching factor.")
    parser.add_argument("--w", type=int, default=16, help="Trajectories per prompt.")
    parser.add_argument("--root-divergence", type=int, default=2, help="Children of the root.")
    parser.add_argument(
        "--prompts", type=int, default=8, help="Number of prompts (synthetic arith problems)."
    )
    parser.add_argument("--block-size", type=int, default=32, help="Engine KV block size.")
    parser.add_argument("--no-align", action="store_true", help="Do not align segment ends to KV blocks.")
    parser.add_argument(
        "--stop-at-eos", action="store_true", help="Honour EOS (default: ignore it, the analytic case)."
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="Engine dtype.")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache size on CPU.")
    parser.add_argument("--seed", type=int, default=0, help="Engine and sampler seed (same for both modes).")
    parser.add_argument("--json", default="", help="Also write the JSON result to this file.")


def _model_dir(spec: str, tmp: str) -> str:
    if spec.startswith("random:"):
        from common.tiny import make_tiny_model

        return str(
            make_tiny_model(
                Path(tmp) / "model", task="arith", size=spec.split(":", 1)[1], warmup_steps=0, progress=False
            )
        )
    from common.models import resolve_model_path

    return resolve_model_path(spec)


def _run_mode(backend, tree_cfg, sampling, inputs, eos, prompts) -> tuple[dict, float]:
    """One mode over ``prompts`` from an empty prefix cache: its sampling metrics and wall time."""
    from actors.sampler import TreeSampler
    from common.sampling_metrics import SamplingStats

    stats = SamplingStats()
    sampler = TreeSampler(backend, tree_cfg, sampling, eos, inputs.decode, stats=stats, require_eos=False)
    backend.reset_prefix_cache()
    t0 = time.perf_counter()
    list(sampler.run(prompts, max_in_flight=len(prompts)))
    wall = time.perf_counter() - t0
    out = stats.as_dict(wall_s=wall)
    out["wall_s"] = wall
    return out, wall


def _tree_shape(args: argparse.Namespace) -> dict:
    """The shape both modes share (``mode`` aside)."""
    return dict(
        w=args.w,
        d=args.d,
        l=args.l,
        b=args.b,
        max_response_tokens=args.d * args.l,
        seed=args.seed,
        root_divergence_min=args.root_divergence,
        root_divergence_max=args.root_divergence,
        align_segments_to_blocks=not args.no_align,
        repetition_check=False,
    )


def _measure(args: argparse.Namespace, model: str) -> tuple[dict, dict, int, list]:
    """Warm-up of both modes on other prompts (untimed, one block per segment), then flat and tree;
    returns (tree metrics, flat metrics, the engine's block size, the timed prompts)."""
    from actors.backends import make_backend
    from actors.engine_inputs import EngineInputs
    from common.config import GeneratorConfig, SamplingConfig, TreeConfig
    from common.tasks import generate

    inputs = EngineInputs.for_model(model)
    eos = inputs.stop_ids if args.stop_at_eos else []
    rows = generate("arith", 2 * args.prompts, seed=args.seed, split="eval")
    encoded = [(r["id"], inputs.tokenizer.encode(r["prompt"], add_special_tokens=False)) for r in rows]
    # distinct warm-up prompts (no cache reuse) with the same batch-size ladder
    warm, prompts = encoded[: args.prompts], encoded[args.prompts :]
    gen = GeneratorConfig(backend=args.backend, block_size=args.block_size, kv_cache_gib=args.kv_cache_gib)
    sampling = SamplingConfig()
    max_len = max(len(p) for _, p in encoded) + args.d * args.l + args.block_size + 8
    backend = make_backend(
        args.backend,
        model,
        gen,
        sampling,
        dtype=args.dtype,
        eos_ids=eos,
        seed=args.seed,
        max_model_len=max_len,
    )
    base = _tree_shape(args)
    try:
        bs = backend.block_size
        short = dict(base, l=bs, max_response_tokens=args.d * bs)
        for mode in ("flat", "tree"):  # warm-up, not timed
            _run_mode(backend, TreeConfig(mode=mode, **short), sampling, inputs, eos, warm)
        flat, _ = _run_mode(backend, TreeConfig(mode="flat", **base), sampling, inputs, eos, prompts)
        tree, _ = _run_mode(backend, TreeConfig(mode="tree", **base), sampling, inputs, eos, prompts)
    finally:
        backend.close()
    return tree, flat, bs, prompts


def run(args: argparse.Namespace) -> int:
    from actors.sampler import analytic_decoded_tokens

    if args.l % args.block_size and not args.no_align and args.backend == "vllm":
        raise ConfigError(
            f"--l {args.l} is not a multiple of --block-size {args.block_size}: segment alignment needs it (or pass --no-align)"
        )
    if args.root_divergence > args.w:
        raise ConfigError(f"--root-divergence {args.root_divergence} > --w {args.w}: lower it")
    lmax = args.d * args.l
    with tempfile.TemporaryDirectory(prefix="treepo-bench-") as tmp:
        tree, flat, bs, prompts = _measure(args, _model_dir(args.model, tmp))
    a_tree = a_flat = 0
    for _, p in prompts:
        t, f = analytic_decoded_tokens(
            args.w, args.d, args.l, args.b, args.root_divergence, lmax, len(p), bs, not args.no_align
        )
        a_tree, a_flat = a_tree + t, a_flat + f
    result = {
        "config": {
            "model": args.model,
            "backend": args.backend,
            "d": args.d,
            "l": args.l,
            "b": args.b,
            "w": args.w,
            "root_divergence": args.root_divergence,
            "prompts": args.prompts,
            "max_response_tokens": lmax,
            "block_size": bs,
            "aligned": not args.no_align,
            "stop_at_eos": args.stop_at_eos,
            "dtype": args.dtype,
            "seed": args.seed,
        },
        "tree": tree,
        "flat": flat,
        "ratios": {
            "wall_tree_over_flat": tree["wall_s"] / flat["wall_s"],
            "decoded_tokens_tree_over_flat": ratio(
                tree["rollout/decoded_tokens"], flat["rollout/decoded_tokens"]
            ),
            "analytic_decoded_tokens_tree_over_flat": a_tree / a_flat,
            "analytic_saving": 1 - a_tree / a_flat,
            "trajectories_per_s_tree_over_flat": ratio(
                tree["rollout/trajectories_per_s"], flat["rollout/trajectories_per_s"]
            ),
            "tokens_per_s_tree_over_flat": ratio(tree["rollout/tokens_per_s"], flat["rollout/tokens_per_s"]),
        },
        "analytic_decoded_tokens": {"tree": a_tree, "flat": a_flat},
    }
    emit_json(result, args.json)
    _print_table(tree, flat, result["ratios"])
    return 0


def _print_table(tree: dict, flat: dict, rr: dict) -> None:
    rows_out = [
        ("wall s", "wall_s", "{:.2f}"),
        ("trajectories/s", "rollout/trajectories_per_s", "{:.1f}"),
        ("tokens/s (trajectory)", "rollout/tokens_per_s", "{:.0f}"),
        ("decoded tokens", "rollout/decoded_tokens", "{:.0f}"),
        ("prefill computed", "rollout/prefill_tokens_computed", "{:.0f}"),
        ("prefill cached", "rollout/prefill_tokens_cached", "{:.0f}"),
        ("engine calls", "rollout/steps", "{:.0f}"),
    ]
    columns = [("metric", 24), ("tree", 14), ("flat", 14), ("tree/flat", 12)]
    rows = [
        [label, fmt.format(tree[key]), fmt.format(flat[key]), f"{ratio(tree[key], flat[key]):.3f}"]
        for label, key, fmt in rows_out
    ]
    print_table(columns, rows)
    sys.stdout.write(
        f"\nwall-clock ratio tree/flat {rr['wall_tree_over_flat']:.3f} vs analytic decoded-token bound "
        f"{rr['analytic_decoded_tokens_tree_over_flat']:.3f} (measured decoded ratio {rr['decoded_tokens_tree_over_flat']:.3f})\n"
    )
