"""``treepo bench eval``: test-time compute of flat vs tree sampling (b ∈ {2, 4, 8}) on the same model,
benchmark, engine and k, in one run — the paper's Table 2 experiment on whatever model is given.

For each mode the same problems get k answers each (flat: k independent samples of at most Lmax
tokens; tree: a segment tree with w = k leaves, depth d, segment length l, branching b), scored with the
task's reward. Printed per mode: mean@k, maj@k, pass@k, decoded tokens, prefill tokens computed, wall
time and trajectories/s, and the ratios tree/flat of tokens and wall time. The paper reports similar
accuracy at 22-43 % fewer GPU-hours; on small models and short answers expect a smaller saving,
since early EOS stops cut flat sampling's cost too.

A warm-up of every mode on other problems runs first (not timed), and the prefix cache is reset before
each timed mode so no mode profits from another's cache.

The settings are a run's config (``--config PRESET`` and ``key=value``, validated like ``treepo
train``'s): the model (``model.path``: also a checkpoint root or run directory, whose ``latest``
pointer is followed), the benchmark (``data.eval``), k (``eval.k``), the problems (``eval.max_problems``)
and the tree shape (``tree.*``; ``Lmax`` = ``tree.max_response_tokens`` for both modes). Without
``--config``, the config's defaults with k = 16 on 32 problems: the warm-started ``tiny:arith`` model on
the synthetic held-out split (a few minutes on 2 cores), 8 segments × 16 tokens, which splits the tiny
model's 30-60-token answers into several segments so the trees branch before the answer (with
32-token segments they mostly finish inside the first one and the tree degenerates to flat
sampling); 16 is below the CPU engine's 32-token KV block, so segment alignment is off there. The
paper's setting on GPU: ``tree.d=8 tree.l=2048 tree.max_response_tokens=16384``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from actors.engine_inputs import EngineInputs
from actors.evaluator import run_eval
from cluster.bench.report import add_bench_arguments, emit_json, print_table, ratio
from cluster.config_args import load_args_config, requested_overrides
from common.config import TrainConfig
from common.errors import ConfigError
from common.models import resolve_eval_model

# the bench's own settings (used without --config); the rest are the config's defaults (the demo's
# model, tree.d=8 tree.l=16 tree.max_response_tokens=128, data.eval=synthetic:arith)
DEFAULTS = ["eval.k=16", "eval.max_problems=32"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warmup-problems", type=int, default=2, help="Problems of the untimed warm-up.")
    p.add_argument(
        "--branching", default="2,4,8", help="Comma-separated branching factors b of the tree runs."
    )
    p.add_argument("--root-divergence", type=int, default=0, help="Children of the root (0 = b).")
    add_bench_arguments(
        p,
        DEFAULTS,
        overrides_help="Config overrides: model.path (a model, checkpoint or run directory, tiny:<task>), "
        "data.eval (a benchmark file or synthetic:<task>), eval.k (answers per problem = tree leaves), "
        "eval.max_problems (0 = all), tree.*, sampling.*, generators.*, reward.*.",
    )


def _modes(branching: list[int]) -> list[tuple[str, int]]:
    return [("flat", 0)] + [("tree", b) for b in branching]


def _measure(
    args: argparse.Namespace,
    cfg: TrainConfig,
    inputs: EngineInputs,
    backend: Any,
    reward: Any,
    warm: list,
    timed: list,
    branching: list[int],
) -> dict[str, dict[str, float]]:
    """Every mode on the warm-up problems (not timed), then on the timed ones, each from an empty
    prefix cache; the summary of each timed mode."""

    def tree_cfg(b: int):
        if not b:  # flat: evaluate() turns it into k independent samples
            return cfg.tree
        rd = args.root_divergence or b
        return dataclasses.replace(cfg.tree, b=b, root_divergence_min=rd, root_divergence_max=rd)

    for sampling, b in _modes(branching):  # warm-up, not timed
        if warm:
            run_eval(backend, inputs, warm, reward, k=cfg.eval.k, sampling=sampling, tree_cfg=tree_cfg(b))
    results: dict[str, dict[str, float]] = {}
    for sampling, b in _modes(branching):
        backend.reset_prefix_cache()
        res = run_eval(backend, inputs, timed, reward, k=cfg.eval.k, sampling=sampling, tree_cfg=tree_cfg(b))
        name = "flat" if sampling == "flat" else f"tree_b{b}"
        results[name] = s = res.summary()
        print(
            f"[bench eval] {name}: mean@{cfg.eval.k}={s[f'mean@{cfg.eval.k}']:.3f} "
            f"decoded={s['decoded_tokens']:.0f} wall={s['wall_s']:.1f}s",
            file=sys.stderr,
            flush=True,
        )
    return results


def _branching(args: argparse.Namespace, k: int) -> list[int]:
    try:
        branching = [int(b) for b in args.branching.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(
            f"--branching {args.branching!r}: pass comma-separated integers, e.g. 2,4,8"
        ) from None
    if not branching or min(branching) < 2 or k < 2:
        raise ConfigError("tree runs need b >= 2 and eval.k >= 2")
    return branching


def load_bench_config(args: argparse.Namespace) -> TrainConfig:
    """The validated config, ``model.path`` resolved (a checkpoint root or run directory: the
    checkpoint its ``latest`` pointer names)."""
    cfg = load_args_config(args, DEFAULTS)
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, path=resolve_eval_model(cfg.model.path))
    )


def run(args: argparse.Namespace, backend: Any = None) -> int:
    """``backend``: reuse an already-open backend (tests share one engine); otherwise one is built."""
    cfg = load_bench_config(args)
    k = cfg.eval.k
    branching = _branching(args, k)
    inputs = EngineInputs.load(cfg)
    data = inputs.prompt_set(cfg.data.eval, "eval", reward="eval")
    warm = data.prompts[: args.warmup_problems]
    timed = data.prompts[args.warmup_problems :]
    if cfg.eval.max_problems:
        timed = timed[: cfg.eval.max_problems]
    if not timed:
        raise ConfigError(f"{data.path} has no problems left after {args.warmup_problems} warm-up problems")
    own_backend = backend is None
    if own_backend:
        # room for the prompts that run, not the whole file
        backend = inputs.open_backend(dataclasses.replace(data, prompts=[*warm, *timed]))
    try:
        results = _measure(args, cfg, inputs, backend, data.reward, warm, timed, branching)
    finally:
        if own_backend:
            backend.close()
    ratios = _ratios_vs_flat(results, k)
    result = {
        "config": {
            "preset": args.config,
            "overrides": requested_overrides(args, DEFAULTS),
            "model": inputs.model_path,
            "data": str(data.path),
            "problems": len(timed),
            "k": k,
            "d": cfg.tree.d,
            "l": cfg.tree.l,
            "max_response_tokens": cfg.tree.max_response_tokens,
            "root_divergence": args.root_divergence or "b",
            "branching": branching,
            "backend": cfg.generators.backend,
            "block_size": backend.block_size,
            "temperature": cfg.sampling.temperature,
            "seed": cfg.seed,
        },
        "results": results,
        "ratios_vs_flat": ratios,
    }
    emit_json(result, args.json)
    _print_table(results, ratios, k)
    return 0


def _ratios_vs_flat(results: dict[str, dict[str, float]], k: int) -> dict[str, dict[str, float]]:
    """Each tree mode against flat sampling: cost ratios and accuracy differences."""
    flat = results["flat"]
    return {
        name: {
            "decoded_tokens": ratio(s["decoded_tokens"], flat["decoded_tokens"]),
            "prefill_tokens_computed": ratio(s["prefill_tokens_computed"], flat["prefill_tokens_computed"]),
            "wall_s": ratio(s["wall_s"], flat["wall_s"]),
            "trajectories_per_s": ratio(s["trajectories_per_s"], flat["trajectories_per_s"]),
            f"mean@{k}_minus_flat": s[f"mean@{k}"] - flat[f"mean@{k}"],
            f"maj@{k}_minus_flat": s[f"maj@{k}"] - flat[f"maj@{k}"],
            f"pass@{k}_minus_flat": s[f"pass@{k}"] - flat[f"pass@{k}"],
        }
        for name, s in results.items()
        if name != "flat"
    }


def _print_table(results: dict[str, dict[str, float]], ratios: dict[str, dict[str, float]], k: int) -> None:
    columns = [("mode", 10), (f"mean@{k}", 14), (f"maj@{k}", 14), (f"pass@{k}", 14), ("decoded", 12)]
    columns += [("prefill", 12), ("wall s", 10), ("traj/s", 10), ("tokens/flat", 13), ("wall/flat", 11)]
    rows = []
    for name, s in results.items():
        r = ratios.get(name, {"decoded_tokens": 1.0, "wall_s": 1.0})
        rows.append(
            [name, *(f"{s[c]:.3f}" for c in (f"mean@{k}", f"maj@{k}", f"pass@{k}"))]
            + [f"{s['decoded_tokens']:.0f}", f"{s['prefill_tokens_computed']:.0f}", f"{s['wall_s']:.2f}"]
            + [f"{s['trajectories_per_s']:.1f}", f"{r['decoded_tokens']:.3f}", f"{r['wall_s']:.3f}"]
        )
    print_table(columns, rows)
