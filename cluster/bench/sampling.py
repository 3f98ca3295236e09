"""``treepo bench sampling``: flat sampling against segment trees grown level-synchronously and
barrier-free, on the same engine, model, prompts, ``w``, max response length and seeds, in one run, at
several tree shapes.

Every mode samples ``tree.w`` trajectories per prompt of at most Lmax tokens; flat is ``w``
independent requests of Lmax tokens (GRPO), a tree is ``d`` segments of ``l`` tokens branching
``tree.b``. The shapes are ``--shapes`` (``DxL``: Lmax = D·L; default 4×64 and 7×32) and the config's
own shape (``tree.d`` × ``tree.l`` with its ``tree.max_response_tokens``, e.g. a long preset's). The
trees grow two ways (``sampling.expansion``): ``level`` (one batched engine call per depth over every
tree: the batch drains at every depth) and ``barrier_free`` (a tree's next depth enters the engine as
soon as its own depth is done). By default EOS is ignored, which is the analytic no-early-stop case:
a tree then decodes exactly ``Σ_k n_k·len_k`` tokens per prompt (``n_k`` live paths at step k: r,
min(b·r, w), …) against ``w·Lmax`` for flat. Per shape the bench reports each mode's wall time, the
engine's batch occupancy (mean requests in the engine per engine step) and engine steps, the wall
ratio tree/flat beside that decoded-token bound, and the share of the analytic saving realised in
wall time, ``(1 − wall_tree/wall_flat) / (1 − tokens_tree/tokens_flat)``. A warm-up of every mode
(excluded from timing) runs first; the prefix cache is reset before each timed mode; ``--repeats``
rounds take the modes in turn and keep each mode's fastest round (a shared machine is noisy).

The settings are a run's config (``--config PRESET`` and ``key=value``, validated like ``treepo
train``'s). Without ``--config`` the bench's own settings apply (:data:`DEFAULTS`): a random-init tiny
Qwen2 of size "s" (``model.tiny_warmup_steps=0``: built once and cached, seconds, offline; another
size with ``model.tiny_size``), segments aligned to the KV blocks, 16 leaves, no repetition stop.
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
from common.config import TrainConfig, TreeConfig, validate
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


MODES = ("flat", "level", "barrier_free")  # flat sampling, then trees grown each way
DEFAULT_SHAPES = "4x64,7x32"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompts",
        type=int,
        default=8,
        help="Number of prompts (problems of the config's synthetic task, data.train; arith otherwise).",
    )
    parser.add_argument(
        "--stop-at-eos", action="store_true", help="Honour EOS (default: ignore it, the analytic case)."
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="Rounds of every mode at every shape, the modes in turn; the fastest round of each is reported.",
    )
    parser.add_argument(
        "--shapes",
        default=DEFAULT_SHAPES,
        help="Tree shapes DxL (segments x segment length, Lmax = D*L), comma-separated, measured besides "
        "the config's own shape (tree.d x tree.l, Lmax tree.max_response_tokens); 'none': only the "
        f"config's. Default {DEFAULT_SHAPES}.",
    )
    add_bench_arguments(
        parser,
        DEFAULTS,
        overrides_help="Config overrides: the shape (tree.w, tree.d, tree.l, tree.b, tree.root_divergence_*, "
        "tree.max_response_tokens = Lmax), model.*, generators.backend/block_size/kv_cache_gib, sampling.*, "
        "seed (engine and prompts) and tree.seed (sampler); every mode shares them.",
    )


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4x64,7x32"`` -> ``[(4, 64), (7, 32)]``; ``"none"`` or empty -> ``[]``."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part or part == "none":
            continue
        d, sep, l = part.lower().partition("x")
        if not sep or not d.isdigit() or not l.isdigit() or int(d) < 1 or int(l) < 1:
            raise ConfigError(f"--shapes entry {part!r} is not DxL (e.g. 4x64): give positive integers")
        out.append((int(d), int(l)))
    return out


def bench_shapes(cfg: TrainConfig, shapes: str) -> list[TreeConfig]:
    """The tree configs measured: each ``--shapes`` entry (Lmax = D·L), then the config's own shape
    unless it is one of them; each validated with the rest of the config."""
    out = [
        dataclasses.replace(cfg.tree, d=d, l=l, max_response_tokens=d * l) for d, l in parse_shapes(shapes)
    ]
    if not any(
        (t.d, t.l, t.max_response_tokens) == (cfg.tree.d, cfg.tree.l, cfg.tree.max_response_tokens)
        for t in out
    ):
        out.append(cfg.tree)
    for t in out:
        validate(dataclasses.replace(cfg, tree=dataclasses.replace(t, mode="tree")))
    return out


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


def _run_mode(backend, tree_cfg, sampling, inputs, eos, prompts) -> dict:
    """One mode over ``prompts`` from an empty prefix cache: its sampling metrics, wall time and the
    engine's batch occupancy (mean requests in the engine per engine step)."""
    stats = SamplingStats()
    sampler = TreeSampler(backend, tree_cfg, sampling, eos, inputs.decode, stats=stats, require_eos=False)
    backend.reset_prefix_cache()
    steps0, reqs0 = backend.counters.engine_steps, backend.counters.engine_requests
    t0 = time.perf_counter()
    list(sampler.run(prompts, max_in_flight=len(prompts)))
    wall = time.perf_counter() - t0
    out = stats.as_dict(wall_s=wall)
    out["wall_s"] = wall
    steps = backend.counters.engine_steps - steps0
    out["engine/steps"] = steps
    out["engine/occupancy"] = ratio(backend.counters.engine_requests - reqs0, steps)
    return out


def _modes(t: TreeConfig, sampling) -> dict[str, tuple[TreeConfig, object]]:
    """Each mode's tree and sampling config: flat, then the tree grown level-synchronously and barrier-free."""
    return {
        "flat": (dataclasses.replace(t, mode="flat"), dataclasses.replace(sampling, expansion="level")),
        "level": (dataclasses.replace(t, mode="tree"), dataclasses.replace(sampling, expansion="level")),
        "barrier_free": (
            dataclasses.replace(t, mode="tree"),
            dataclasses.replace(sampling, expansion="barrier_free"),
        ),
    }


def _measure(
    args: argparse.Namespace, cfg: TrainConfig, model: str, shapes: list[TreeConfig]
) -> tuple[list[dict], int, list]:
    """A warm-up of every mode on other prompts (untimed, one block per segment), then every mode at
    every shape; returns (per shape {mode: metrics}, the engine's block size, the timed prompts)."""
    inputs = EngineInputs.for_model(model)
    eos = inputs.stop_ids if args.stop_at_eos else []
    # the config's synthetic task (a long preset's problems have longer prompts), else arith's
    spec = cfg.data.train if isinstance(cfg.data.train, str) else ""
    task = spec.removeprefix("synthetic:") if spec.startswith("synthetic:") else "arith"
    rows = generate(task, 2 * args.prompts, seed=cfg.seed, split="eval")
    encoded = [(r["id"], inputs.tokenizer.encode(r["prompt"], add_special_tokens=False)) for r in rows]
    # distinct warm-up prompts (no cache reuse) with the same batch-size ladder
    warm, prompts = encoded[: args.prompts], encoded[args.prompts :]
    gen = cfg.generators
    longest = max(t.max_response_tokens for t in shapes)
    max_len = max(len(p) for _, p in encoded) + longest + gen.block_size + 8
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
        short = dataclasses.replace(cfg.tree, l=bs, max_response_tokens=cfg.tree.d * bs)
        for tree_cfg, sampling in _modes(short, cfg.sampling).values():  # warm-up, not timed
            _run_mode(backend, tree_cfg, sampling, inputs, eos, warm)
        measured = [
            _measure_shape(backend, t, cfg.sampling, inputs, eos, prompts, args.repeats) for t in shapes
        ]
    finally:
        backend.close()
    return measured, bs, prompts


def _measure_shape(backend, t: TreeConfig, sampling, inputs, eos, prompts, repeats: int) -> dict[str, dict]:
    """Every mode at shape ``t``, ``repeats`` rounds with the modes in turn (flat, level, barrier-free,
    flat, ...), so a slow stretch of a shared machine falls on every mode; per mode the round with the
    lowest wall time, and every round's wall time (``wall_s_rounds``)."""
    modes = _modes(t, sampling)
    rounds: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(max(1, repeats)):
        for mode, (tree_cfg, mode_sampling) in modes.items():
            rounds[mode].append(_run_mode(backend, tree_cfg, mode_sampling, inputs, eos, prompts))
    out = {}
    for mode, runs in rounds.items():
        out[mode] = dict(min(runs, key=lambda r: r["wall_s"]))
        out[mode]["wall_s_rounds"] = [r["wall_s"] for r in runs]
    return out


def _analytic(t: TreeConfig, prompts: list, bs: int) -> tuple[int, int]:
    """(tree, flat) decoded tokens of ``prompts`` with no early stop (summed over prompts)."""
    a_tree = a_flat = 0
    for _, p in prompts:
        tree, flat = analytic_decoded_tokens(
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
        a_tree, a_flat = a_tree + tree, a_flat + flat
    return a_tree, a_flat


def run(args: argparse.Namespace) -> int:
    cfg = load_bench_config(args)
    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats}: give at least 1 round")
    shapes = bench_shapes(cfg, args.shapes)
    measured, bs, prompts = _measure(args, cfg, resolve_model(cfg.model), shapes)
    t = cfg.tree
    results = []
    for shape, modes in zip(shapes, measured):
        a_tree, a_flat = _analytic(shape, prompts, bs)
        results.append(
            {
                "shape": f"{shape.d}x{shape.l}",
                "d": shape.d,
                "l": shape.l,
                "max_response_tokens": shape.max_response_tokens,
                **modes,
                "ratios": _ratios(modes, a_tree, a_flat),
                "analytic_decoded_tokens": {"tree": a_tree, "flat": a_flat},
            }
        )
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
            "repeats": args.repeats,
            "max_response_tokens": t.max_response_tokens,
            "shapes": [r["shape"] for r in results],
            "block_size": bs,
            "aligned": t.align_segments_to_blocks,
            "stop_at_eos": args.stop_at_eos,
            "dtype": cfg.model.dtype,
            "seed": cfg.seed,
            "tree_seed": t.seed,
        },
        "shapes": results,
    }
    emit_json(result, args.json)
    _print_table(results)
    return 0


def _ratios(modes: dict, a_tree: int, a_flat: int) -> dict[str, float]:
    """Per tree mode: wall and decoded tokens over flat's, and the share of the analytic saving
    realised in wall time; barrier-free's wall over level's."""
    flat = modes["flat"]
    saving = 1 - a_tree / a_flat
    out = {"analytic_decoded_tokens_tree_over_flat": a_tree / a_flat, "analytic_saving": saving}
    for mode in ("level", "barrier_free"):
        m = modes[mode]
        wall = m["wall_s"] / flat["wall_s"]
        out[f"wall_{mode}_over_flat"] = wall
        out[f"decoded_tokens_{mode}_over_flat"] = ratio(
            m["rollout/decoded_tokens"], flat["rollout/decoded_tokens"]
        )
        out[f"saving_realised_{mode}"] = ratio(1 - wall, saving)
    out["wall_barrier_free_over_level"] = modes["barrier_free"]["wall_s"] / modes["level"]["wall_s"]
    return out


def _print_table(results: list[dict]) -> None:
    rows_out = [
        ("wall s", "wall_s", "{:.2f}"),
        ("engine occupancy", "engine/occupancy", "{:.1f}"),
        ("engine steps", "engine/steps", "{:.0f}"),
        ("engine calls", "rollout/steps", "{:.0f}"),
        ("decoded tokens", "rollout/decoded_tokens", "{:.0f}"),
        ("prefill computed", "rollout/prefill_tokens_computed", "{:.0f}"),
        ("prefill cached", "rollout/prefill_tokens_cached", "{:.0f}"),
    ]
    columns = [("shape / metric", 24), ("flat", 11), ("level", 11), ("barrier-free", 13)]
    columns += [("level/flat", 11), ("free/flat", 10)]
    rows = []
    for r in results:
        rows.append([f"{r['shape']} (Lmax {r['max_response_tokens']})", "", "", "", "", ""])
        for label, key, fmt in rows_out:
            f, lv, bf = (r[m][key] for m in MODES)
            rows.append(
                [f"  {label}", fmt.format(f), fmt.format(lv), fmt.format(bf)]
                + [f"{ratio(lv, f):.3f}", f"{ratio(bf, f):.3f}"]
            )
    print_table(columns, rows)
    for r in results:
        rr = r["ratios"]
        sys.stdout.write(
            f"\n{r['shape']}: wall tree/flat level {rr['wall_level_over_flat']:.3f}, barrier-free "
            f"{rr['wall_barrier_free_over_flat']:.3f} vs analytic decoded-token bound "
            f"{rr['analytic_decoded_tokens_tree_over_flat']:.3f}: saving realised level "
            f"{rr['saving_realised_level']:.0%}, barrier-free {rr['saving_realised_barrier_free']:.0%}"
        )
    sys.stdout.write("\n")
