"""``treepo bench sampling``: tree vs flat sampling on the same engine, model, prompts, ``w``, max
response length and seeds, in one run.

Both modes sample ``tree.w`` trajectories per prompt of at most Lmax = ``tree.max_response_tokens``
tokens; flat is ``w`` independent requests of Lmax tokens (GRPO), tree is the segment tree (``tree.d``
× ``tree.l``, branching ``tree.b``). By default EOS is ignored, which is the analytic no-early-stop
case: the tree then decodes exactly ``Σ_k n_k·len_k`` tokens per prompt (``n_k`` live paths at step k:
r, min(b·r, w), …) against ``w·Lmax`` for flat, and the wall-clock ratio tree/flat is printed beside
that bound. A warm-up of both modes (excluded from timing) runs first; the prefix cache is reset
before each timed mode.

The settings are a run's config (``--config PRESET`` and ``key=value``, validated like ``treepo
train``'s). Without ``--config`` the bench's own settings apply (:data:`DEFAULTS`): a random-init tiny
Qwen2 of size "s" (``model.tiny_warmup_steps=0``: built once and cached, seconds, offline; another
size with ``model.tiny_size``), 4 segments of 64 tokens aligned to the KV blocks, 16 leaves, Lmax 256,
no repetition stop.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from actors.backends import make_backend
from actors.engine_inputs import EngineInputs
from actors.sampler import TreeSampler, analytic_decoded_tokens
from cluster.bench.report import add_bench_arguments, emit_json, model_label, print_table, ratio
from cluster.config_args import load_args_config, requested_overrides
from common.config import TrainConfig, validate
from common.errors import ConfigError
from common.models import resolve_model
from common.sampling_metrics import SamplingStats
from common.tasks import generate

# the bench's own settings (used without --config): a random-init tiny model of size "s", 4 aligned
# segments of 64 tokens, 16 leaves, no repetition stop (the analytic no-early-stop case)
DEFAULTS = [
    "model.path=tiny:arith",
    "model.tiny_warmup_steps=0",
    "tree.w=16",
    "tree.d=4",
    "tree.l=64",
    "tree.max_response_tokens=256",
    "tree.align_segments_to_blocks=true",
    "tree.repetition_check=false",
    "generators.kv_cache_gib=1.0",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompts", type=int, default=8, help="Number of prompts (synthetic arith problems)."
    )
    parser.add_argument(
        "--stop-at-eos", action="store_true", help="Honour EOS (default: ignore it, the analytic case)."
    )
    add_bench_arguments(
        parser,
        DEFAULTS,
        overrides_help="Config overrides: the shape (tree.w, tree.d, tree.l, tree.b, tree.root_divergence_*, "
        "tree.max_response_tokens = Lmax), model.*, generators.backend/block_size/kv_cache_gib, sampling.*, "
        "seed (engine and prompts) and tree.seed (sampler); both modes share them.",
    )


def load_bench_config(args: argparse.Namespace) -> TrainConfig:
    """The validated config; the tree mode is checked too (the bench runs both modes), and the
    analytic count needs one root divergence."""
    cfg = load_args_config(args, DEFAULTS)
    validate(dataclasses.replace(cfg, tree=dataclasses.replace(cfg.tree, mode="tree")))
    t = cfg.tree
    if t.root_divergence_min != t.root_divergence_max:
        raise ConfigError(
            f"tree.root_divergence_min={t.root_divergence_min} != tree.root_divergence_max="
            f"{t.root_divergence_max}: the analytic token count needs one root divergence; set both alike"
        )
    return cfg


def _run_mode(backend, tree_cfg, sampling, inputs, eos, prompts) -> tuple[dict, float]:
    """One mode over ``prompts`` from an empty prefix cache: its sampling metrics and wall time."""
    stats = SamplingStats()
    sampler = TreeSampler(backend, tree_cfg, sampling, eos, inputs.decode, stats=stats, require_eos=False)
    backend.reset_prefix_cache()
    t0 = time.perf_counter()
    list(sampler.run(prompts, max_in_flight=len(prompts)))
    wall = time.perf_counter() - t0
    out = stats.as_dict(wall_s=wall)
    out["wall_s"] = wall
    return out, wall


def _measure(args: argparse.Namespace, cfg: TrainConfig, model: str) -> tuple[dict, dict, int, list]:
    """Warm-up of both modes on other prompts (untimed, one block per segment), then flat and tree;
    returns (tree metrics, flat metrics, the engine's block size, the timed prompts)."""
    inputs = EngineInputs.for_model(model)
    eos = inputs.stop_ids if args.stop_at_eos else []
    rows = generate("arith", 2 * args.prompts, seed=cfg.seed, split="eval")
    encoded = [(r["id"], inputs.tokenizer.encode(r["prompt"], add_special_tokens=False)) for r in rows]
    # distinct warm-up prompts (no cache reuse) with the same batch-size ladder
    warm, prompts = encoded[: args.prompts], encoded[args.prompts :]
    gen, t = cfg.generators, cfg.tree
    max_len = max(len(p) for _, p in encoded) + t.d * t.l + gen.block_size + 8
    backend = make_backend(
        gen.backend,
        model,
        gen,
        cfg.sampling,
        dtype=cfg.model.dtype,
        eos_ids=eos,
        seed=cfg.seed,
        max_model_len=max_len,
    )
    try:
        bs = backend.block_size
        short = dataclasses.replace(t, l=bs, max_response_tokens=t.d * bs)
        for mode in ("flat", "tree"):  # warm-up, not timed
            warm_cfg = dataclasses.replace(short, mode=mode)
            _run_mode(backend, warm_cfg, cfg.sampling, inputs, eos, warm)
        flat, _ = _run_mode(backend, dataclasses.replace(t, mode="flat"), cfg.sampling, inputs, eos, prompts)
        tree, _ = _run_mode(backend, dataclasses.replace(t, mode="tree"), cfg.sampling, inputs, eos, prompts)
    finally:
        backend.close()
    return tree, flat, bs, prompts


def run(args: argparse.Namespace) -> int:
    cfg = load_bench_config(args)
    t = cfg.tree
    tree, flat, bs, prompts = _measure(args, cfg, resolve_model(cfg.model))
    a_tree = a_flat = 0
    for _, p in prompts:
        tokens = analytic_decoded_tokens(
            t.w,
            t.d,
            t.l,
            t.b,
            t.root_divergence_min,
            t.max_response_tokens,
            len(p),
            bs,
            t.align_segments_to_blocks,
        )
        a_tree, a_flat = a_tree + tokens[0], a_flat + tokens[1]
    result = {
        "config": {
            "preset": args.config,
            "overrides": requested_overrides(args, DEFAULTS),
            "model": model_label(cfg.model),
            "backend": cfg.generators.backend,
            "d": t.d,
            "l": t.l,
            "b": t.b,
            "w": t.w,
            "root_divergence": t.root_divergence_min,
            "prompts": args.prompts,
            "max_response_tokens": t.max_response_tokens,
            "block_size": bs,
            "aligned": t.align_segments_to_blocks,
            "stop_at_eos": args.stop_at_eos,
            "dtype": cfg.model.dtype,
            "seed": cfg.seed,
            "tree_seed": t.seed,
        },
        "tree": tree,
        "flat": flat,
        "ratios": _ratios(tree, flat, a_tree, a_flat),
        "analytic_decoded_tokens": {"tree": a_tree, "flat": a_flat},
    }
    emit_json(result, args.json)
    _print_table(tree, flat, result["ratios"])
    return 0


def _ratios(tree: dict, flat: dict, a_tree: int, a_flat: int) -> dict[str, float]:
    return {
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
    }


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
