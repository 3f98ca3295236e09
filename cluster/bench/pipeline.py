"""``treepo bench pipeline``: asynchronous vs synchronous pipeline throughput on the same config, in one
run, plus a synthetic workload of known cost checked against the ideal overlap bound.

Every case runs the real pipeline (``driver=ray``: generator and learner actors on one local Ray, the
embedded Redis, weights over the weight-sync group) twice on the same config: ``async``
(``algo.max_staleness=1``: generation of step k+1 overlaps training of step k) and ``sync``
(``algo.max_staleness=0``: generation waits for every weight update). Cases:

- ``real``: the work as configured (``--config PRESET`` and ``key=value``, validated like ``treepo
  train``'s; default: the CPU demo's model and tree shape, ``learner.total_steps=6`` per run).
- ``synthetic``: the same, plus a fixed sleep per sampler step (``--gen-delay-s``) and per learner
  step (``--train-delay-s``), so that generation and training each have a known, dominant cost.

Throughput counts trained trees (and leaves = samples) per second between the end of the first step
and the end of the last one, which leaves out actor start-up and the first step's warm-up.
The ideal overlap bound uses the synchronous run's per-step WORK (not its waits): ``G`` = the
generators' busy seconds per step (engine calls, scoring, pushing; ``generator/busy_s``) and ``T`` =
the learner side's seconds per step (training, weight sync, checkpoint). In that run the two never
overlap, so neither slows the other down. A synchronous schedule cannot beat ``B / (G + T)`` trees/s,
an asynchronous one with staleness ≥ 1 cannot beat ``B / max(G, T)``; the report gives each measured
throughput as a share of its bound and the async speed-up next to the ideal one,
``(G + T) / max(G, T)``. On a machine with fewer cores than actors, overlapping work competes for
them, so the async share of the bound measures that contention too. The bound assumes the same
work per step in both schedules; a batching engine breaks that in async's favour (it keeps more
trees in flight, so each engine call serves more of them), so async can exceed it (measured on
the CPU demo: 122 %).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cluster.bench.report import emit_json
from cluster.config_args import add_config_arguments, load_args_config, requested_overrides
from common.metrics import read_metrics

MODES = {"async": "algo.max_staleness=1", "sync": "algo.max_staleness=0"}


# the bench's own setting (used without --config): 6 learner steps per run (the first is warm-up)
DEFAULTS = ["learner.total_steps=6"]
# every run's settings, under the user's overrides (the schedule arm, MODES, goes on top of those)
RUN_SETTINGS = ["driver=ray", "eval.every_steps=0", "log.progress=false", "log.backends=[]"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", default="real,synthetic", help="Comma-separated: real, synthetic.")
    parser.add_argument(
        "--gen-delay-s", type=float, default=0.5, help="Synthetic case: added seconds per sampler step."
    )
    parser.add_argument(
        "--train-delay-s", type=float, default=2.0, help="Synthetic case: added seconds per learner step."
    )
    parser.add_argument("--out", default="", help="Directory for the report JSON (default: print only).")
    add_config_arguments(
        parser,
        defaults=DEFAULTS,
        overrides_help="Config overrides applied to every run (e.g. model.path=... tree.w=16; "
        "learner.total_steps: learner steps per run, the first is warm-up).",
    )


def overlap_bound(gen_s: float, rest_s: float, batch: int) -> dict[str, float]:
    """Ideal trees/s of the two schedules for per-step generation ``gen_s`` and the rest ``rest_s``."""
    if gen_s < 0 or rest_s < 0 or gen_s + rest_s <= 0:
        raise ValueError(f"step times must be >= 0 and not both 0 (got {gen_s}, {rest_s})")
    sync = batch / (gen_s + rest_s)
    overlapped = batch / max(gen_s, rest_s)
    return {"sync_trees_per_s": sync, "async_trees_per_s": overlapped, "speedup": overlapped / sync}


def summarize(rows: list[dict], batch: int, leaves_per_tree: int) -> dict[str, float]:
    """Throughput and step-time breakdown of one run's metrics rows (step 0 = start-up eval: ignored)."""
    steps = [r for r in rows if r.get("step", 0) >= 1 and "timing/step_s" in r]
    if len(steps) < 2:
        raise ValueError(f"need at least 2 logged steps to measure throughput, got {len(steps)}")
    span = steps[-1]["time"] - steps[0]["time"]
    trees = batch * (len(steps) - 1)
    measured = steps[1:]
    gen = statistics.mean(r["timing/generate_s"] for r in measured)
    step = statistics.mean(r["timing/step_s"] for r in measured)
    last = steps[-1]
    busy = [r.get("generator/busy_s", 0.0) for r in steps]
    learner_s = statistics.mean(
        r["timing/train_s"] + r.get("timing/sync_s", 0.0) + r.get("timing/checkpoint_s", 0.0)
        for r in measured
    )
    return {
        "gen_busy_s": (busy[-1] - busy[0]) / len(measured),
        "learner_busy_s": learner_s,
        "steps_measured": len(measured),
        "trees_per_s": trees / span,
        "samples_per_s": trees * leaves_per_tree / span,
        "step_s": span / len(measured),
        "generate_s": gen,
        "rest_s": max(0.0, step - gen),
        "train_s": statistics.mean(r["timing/train_s"] for r in measured),
        "sync_s": statistics.mean(r.get("timing/sync_s", 0.0) for r in measured),
        "learner_idle_frac": last.get("learner/idle_frac", float("nan")),
        "generator_idle_frac": last.get("generator/idle_frac", float("nan")),
        "staleness_max": max(r.get("staleness/max", 0.0) for r in measured),
    }


def _one_run(case: str, mode: str, args: argparse.Namespace, steps: int, scratch: Path) -> dict:
    run_dir = scratch / f"{case}-{mode}"
    before = [f"run_dir={run_dir}", *RUN_SETTINGS, f"checkpoint.every_steps={steps}"]
    # synthetic: the known cost is per sampler step, one depth of every tree (level-synchronous)
    after = [MODES[mode], *(["sampling.expansion=level"] if case == "synthetic" else [])]
    cfg = load_args_config(args, DEFAULTS, before=before, after=after)
    env = {}
    if case == "synthetic":
        env = {
            "TREEPO_BENCH_GEN_DELAY_S": str(args.gen_delay_s),
            "TREEPO_BENCH_TRAIN_DELAY_S": str(args.train_delay_s),
        }
    # the pipeline (ray, torch): only when the bench runs (`treepo --help` imports this module)
    from cluster.pipeline.controller import run_pipeline

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    t0 = time.perf_counter()
    print(f"[bench pipeline] {case}/{mode}: {steps} steps ...", flush=True)
    try:
        run_pipeline(cfg)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out = summarize(read_metrics(run_dir / "metrics.jsonl"), cfg.learner.prompts_per_step, cfg.tree.w)
    out["wall_s"] = time.perf_counter() - t0
    print(
        f"[bench pipeline] {case}/{mode}: {out['trees_per_s']:.3f} trees/s, step {out['step_s']:.2f} s",
        flush=True,
    )
    return out


def _cases(args: argparse.Namespace) -> list[str] | None:
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in ("real", "synthetic")]
    if bad or not cases:
        print(
            f"treepo bench pipeline: error: unknown case(s) {bad}; use real and/or synthetic", file=sys.stderr
        )
        return None
    return cases


def _measure(args: argparse.Namespace, cases: list[str], steps: int, batch: int) -> dict[str, dict]:
    """Both schedules of every case on one Ray (start-up is not what is measured)."""
    import ray  # only when the bench runs (`treepo --help` imports this module)

    results: dict[str, dict] = {}
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False
        )
    try:
        with tempfile.TemporaryDirectory(prefix="treepo-bench-pipeline-") as scratch:
            for case in cases:
                runs = {mode: _one_run(case, mode, args, steps, Path(scratch)) for mode in MODES}
                a, s = runs["async"], runs["sync"]
                bound = overlap_bound(s["gen_busy_s"], s["learner_busy_s"], batch=batch)
                results[case] = {
                    **runs,
                    "async_over_sync": a["trees_per_s"] / s["trees_per_s"],
                    "ideal": bound,
                    "async_share_of_ideal": a["trees_per_s"] / bound["async_trees_per_s"],
                    "sync_share_of_ideal": s["trees_per_s"] / bound["sync_trees_per_s"],
                }
    finally:
        if started:
            ray.shutdown()
    return results


def run(args: argparse.Namespace) -> int:
    cases = _cases(args)
    if cases is None:
        return 2
    cfg = load_args_config(args, DEFAULTS, before=RUN_SETTINGS)  # every run's config, checked up front
    steps = cfg.learner.total_steps
    if steps < 3:
        print(
            "treepo bench pipeline: error: learner.total_steps must be >= 3 (one warm-up step + two measured)",
            file=sys.stderr,
        )
        return 2
    results = _measure(args, cases, steps, cfg.learner.prompts_per_step)
    report = {
        "bench": "pipeline",
        "steps": steps,
        "preset": args.config,
        "overrides": requested_overrides(args, DEFAULTS),
        "synthetic_delays_s": {
            "generate_per_sampler_step": args.gen_delay_s,
            "train_per_step": args.train_delay_s,
        },
        "cpu_count": os.cpu_count(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "results": results,
    }
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    emit_json(report, Path(args.out) / "bench_pipeline.json" if args.out else "", indent=1)
    print(
        f"\n{'case':<10} {'mode':<6} {'trees/s':>8} {'samples/s':>10} {'step s':>7} {'G busy':>6} {'T busy':>6} "
        f"{'learner idle':>12} {'gen idle':>8} {'stale':>5}"
    )
    for case, res in results.items():
        for mode in MODES:
            r = res[mode]
            print(
                f"{case:<10} {mode:<6} {r['trees_per_s']:>8.3f} {r['samples_per_s']:>10.2f} {r['step_s']:>7.2f} "
                f"{r['gen_busy_s']:>6.2f} {r['learner_busy_s']:>6.2f} {r['learner_idle_frac']:>12.2f} "
                f"{r['generator_idle_frac']:>8.2f} {r['staleness_max']:>5.0f}"
            )
        ideal = res["ideal"]
        print(
            f"{case:<10} async/sync {res['async_over_sync']:.2f}x (ideal {ideal['speedup']:.2f}x); async reached "
            f"{res['async_share_of_ideal']:.0%} of its bound {ideal['async_trees_per_s']:.3f} trees/s, sync "
            f"{res['sync_share_of_ideal']:.0%} of {ideal['sync_trees_per_s']:.3f}"
        )
    sys.stdout.flush()
    return 0
