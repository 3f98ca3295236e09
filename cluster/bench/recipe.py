"""``treepo bench recipe``: TreePO against GRPO at equal compute budget per step, over seeds.

Both arms train with the synchronous driver (``driver=local``; ``driver=ray`` on the command line
runs them on the asynchronous pipeline instead) on the same task, model, prompts per
step (``learner.prompts_per_step``), leaves per prompt (``tree.w``), steps and loss; they differ only
in sampling and advantage:

- ``treepo``: ``tree.mode=tree``, ``algo.advantage=treepo`` (segment trees, subgroup advantages);
- ``grpo``: ``tree.mode=flat``, ``algo.advantage=grpo`` (``w`` independent samples of up to Lmax
  tokens each, ``(R - mean) / std`` per prompt);
- ``treepo-prob`` (with ``--arms``): ``treepo`` with ``tree.allocation=prob_low``, the
  probability-driven child allocation (``tree.prob_*`` set the score and temperature).

Each seed sets ``seed``, ``tree.seed`` and ``data.shuffle_seed`` (both arms of a seed see the same
prompt order). Both arms start from one config (``--config PRESET`` and ``key=value``, validated
like ``treepo train``'s; without ``--config``: the demo with 20 steps, an evaluation every 5 steps on
64 problems). Held-out accuracy (``eval/accuracy``, ``eval.max_problems`` problems × ``eval.k``
answers) is measured every ``eval.every_steps`` steps over ``learner.total_steps`` steps and read
against the step, the engine's decoded tokens so far (``rollout/decoded_tokens``) and the
training wall seconds so far (the sum of ``timing/step_s``: sampling, scoring, the learner step, the
weight push; evaluation excluded). Each run is its own ``treepo train`` process (its own engine and
learner, from the model's weights); its console output goes to ``<out-dir>/<arm>-seed<k>.log``.

Output: ``<out-dir>/recipe.json`` (every run's curve, per arm the final accuracy as mean/min/max
over seeds and the totals, and the ratios treepo/grpo of decoded tokens and wall seconds), a table,
and ``acc_vs_step.png``, ``acc_vs_tokens.png``, ``acc_vs_wall.png`` (mean over seeds, the band is the
min-max over seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cluster.bench.report import add_bench_arguments, emit_json, print_table
from cluster.config_args import load_args_config, requested_overrides
from cluster.signals import run_child
from common.config import TrainConfig, load_config
from common.metrics import read_metrics

ARMS: dict[str, list[str]] = {
    "treepo": ["tree.mode=tree", "algo.advantage=treepo"],
    "grpo": ["tree.mode=flat", "algo.advantage=grpo"],
    # the probability-driven allocation: more children for the paths the policy found least likely
    "treepo-prob": ["tree.mode=tree", "algo.advantage=treepo", "tree.allocation=prob_low"],
}
DEFAULT_ARMS = "treepo,grpo"
AXES = {"step": "step", "tokens": "decoded tokens", "wall": "training wall seconds"}


# the bench's own settings (used without --config): 20 steps, held-out accuracy every 5 steps on 64
# problems (x eval.k answers)
DEFAULTS = ["learner.total_steps=20", "eval.every_steps=5", "eval.max_problems=64"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=3, help="Seeds per arm (0..N-1).")
    p.add_argument(
        "--arms",
        default=DEFAULT_ARMS,
        help=f"Comma-separated arms among {', '.join(ARMS)} (default {DEFAULT_ARMS}); ratios are against grpo.",
    )
    p.add_argument("--out-dir", default="runs/recipe", help="Run directories, recipe.json and the plots.")
    add_bench_arguments(
        p,
        DEFAULTS,
        config_help="Preset YAML both arms start from (a path or a name in configs/; default: the demo).",
        overrides_help="Config overrides for both arms, e.g. tree.w=8; learner.total_steps (steps per run), "
        "eval.every_steps (held-out evaluation every N steps, and at 0), eval.max_problems and eval.k "
        "(held-out problems and answers per problem).",
    )


def run_overrides(args: argparse.Namespace, arm: str, seed: int, steps: int) -> list[str]:
    """The ``key=value`` list of one run of ``steps`` steps (the user's overrides first; the arm and
    seed win)."""
    requested = requested_overrides(args, DEFAULTS)
    driver = [] if any(o.startswith("driver=") for o in args.overrides) else ["driver=local"]
    return [
        *requested,
        *ARMS[arm],
        f"run_dir={Path(args.out_dir) / f'{arm}-seed{seed}'}",
        *driver,
        f"seed={seed}",
        f"tree.seed={seed}",
        f"data.shuffle_seed={seed}",
        f"checkpoint.every_steps={steps}",
        "log.progress=false",
    ]


def _check(args: argparse.Namespace) -> TrainConfig:
    """The config both arms start from, checked: seeds and a held-out evaluation."""
    cfg = load_args_config(args, DEFAULTS)
    if args.seeds < 1 or cfg.eval.every_steps < 1:
        raise SystemExit("treepo bench recipe: --seeds and eval.every_steps must be >= 1")
    unknown = [a for a in arms(args) if a not in ARMS]
    if unknown or not arms(args):
        raise SystemExit(f"treepo bench recipe: --arms {args.arms!r}: choose among {', '.join(ARMS)}")
    return cfg


def arms(args: argparse.Namespace) -> list[str]:
    """The arms of ``--arms``, in its order."""
    return [a.strip() for a in getattr(args, "arms", DEFAULT_ARMS).split(",") if a.strip()]


def curve(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """A run's held-out accuracy at each evaluated step, with decoded tokens and wall seconds so far."""
    tokens = wall = 0.0
    out: dict[str, list[float]] = {"step": [], "tokens": [], "wall": [], "accuracy": []}
    for r in sorted(rows, key=lambda r: r["step"]):
        tokens = float(r.get("rollout/decoded_tokens", tokens))
        wall += float(r.get("timing/step_s", 0.0))
        if "eval/accuracy" in r:
            for key, v in (("step", r["step"]), ("tokens", tokens), ("wall", wall)):
                out[key].append(float(v))
            out["accuracy"].append(float(r["eval/accuracy"]))
    return out


def summarize(curves: dict[str, dict[int, dict[str, list[float]]]]) -> dict[str, Any]:
    """Per arm: final accuracy (mean, min, max over seeds), mean totals; ratios treepo/grpo."""
    out: dict[str, Any] = {}
    for arm, by_seed in curves.items():
        finals = [c["accuracy"][-1] for c in by_seed.values() if c["accuracy"]]
        firsts = [c["accuracy"][0] for c in by_seed.values() if c["accuracy"]]
        out[arm] = {
            "seeds": len(by_seed),
            "first_accuracy_mean": _mean(firsts),
            "final_accuracy_mean": _mean(finals),
            "final_accuracy_min": min(finals, default=math.nan),
            "final_accuracy_max": max(finals, default=math.nan),
            "decoded_tokens_mean": _mean([c["tokens"][-1] for c in by_seed.values() if c["tokens"]]),
            "wall_s_mean": _mean([c["wall"][-1] for c in by_seed.values() if c["wall"]]),
            "command_wall_s_mean": _mean(
                [c["command_wall_s"] for c in by_seed.values() if "command_wall_s" in c]
            ),
        }
    g = out.get("grpo")
    for arm in [a for a in out if a != "grpo"] if g else []:
        t = out[arm]
        out[f"{arm}_over_grpo"] = {
            "decoded_tokens": _ratio(t["decoded_tokens_mean"], g["decoded_tokens_mean"]),
            "wall_s": _ratio(t["wall_s_mean"], g["wall_s_mean"]),
            "command_wall_s": _ratio(t["command_wall_s_mean"], g["command_wall_s_mean"]),
            "final_accuracy_diff": t["final_accuracy_mean"] - g["final_accuracy_mean"],
        }
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def plot(curves: dict[str, dict[int, dict[str, list[float]]]], out_dir: Path) -> list[Path]:
    """Accuracy against step, decoded tokens and wall seconds: per arm the mean over seeds (x and y
    at each evaluation) and a band from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for axis, label in AXES.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for arm, by_seed in curves.items():
            runs = [c for c in by_seed.values() if c["accuracy"]]
            n = min(len(c["accuracy"]) for c in runs) if runs else 0
            if not n:
                continue
            xs = [_mean([c[axis][i] for c in runs]) for i in range(n)]
            accs = [[c["accuracy"][i] for c in runs] for i in range(n)]
            ax.plot(xs, [_mean(a) for a in accs], marker="o", label=f"{arm} (mean of {len(runs)} seeds)")
            ax.fill_between(xs, [min(a) for a in accs], [max(a) for a in accs], alpha=0.2)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy")
        ax.set_title(f"TreePO vs GRPO: held-out accuracy against {label}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"acc_vs_{axis}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _train(args: argparse.Namespace, overrides: list[str], log_path: Path) -> float:
    """One ``treepo train`` process, its wall seconds returned; a failure stops the benchmark naming
    the run's log."""
    cmd = [sys.executable, "-m", "cluster", "train", *(["--config", args.config] if args.config else [])]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        rc = run_child([*cmd, *overrides], stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"treepo bench recipe: a training run failed (exit {rc}): see {log_path}")
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    base = _check(args)
    steps = base.learner.total_steps
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # the arms of a seed run one after the other, so a machine whose load drifts skews no arm
    runs = {(a, s): run_overrides(args, a, s, steps) for s in range(args.seeds) for a in arms(args)}
    cfgs = {key: load_config(args.config, ov) for key, ov in runs.items()}  # every run checked up front
    curves: dict[str, dict[int, dict[str, list[float]]]] = {a: {} for a in arms(args)}
    for (arm, seed), overrides in runs.items():
        print(f"[recipe] {arm} seed {seed}: {steps} steps", flush=True)
        command_wall = _train(args, overrides, out_dir / f"{arm}-seed{seed}.log")
        curves[arm][seed] = curve(read_metrics(Path(cfgs[arm, seed].run_dir) / "metrics.jsonl"))
        curves[arm][seed]["command_wall_s"] = command_wall
    report = {
        "steps": steps,
        "seeds": args.seeds,
        "eval_every": base.eval.every_steps,
        "eval_problems": base.eval.max_problems,
        "eval_k": base.eval.k,
        "preset": args.config,
        "driver": next(iter(cfgs.values())).driver,
        "overrides": requested_overrides(args, DEFAULTS),
        "summary": summarize(curves),
        "curves": {a: {str(s): c for s, c in by.items()} for a, by in curves.items()},
        "plots": [str(p) for p in plot(curves, out_dir)],
    }
    (out_dir / "recipe.json").write_text(json.dumps(report, indent=2) + "\n")
    emit_json(report["summary"], args.json)
    cols = [
        ("arm", 12),
        ("acc first", 10),
        ("acc final", 10),
        ("min", 7),
        ("max", 7),
        ("tokens", 12),
        ("wall s", 9),
        ("command s", 10),
    ]
    rows = [
        [
            arm,
            f"{s['first_accuracy_mean']:.3f}",
            f"{s['final_accuracy_mean']:.3f}",
            f"{s['final_accuracy_min']:.3f}",
            f"{s['final_accuracy_max']:.3f}",
            f"{s['decoded_tokens_mean']:.0f}",
            f"{s['wall_s_mean']:.1f}",
            f"{s['command_wall_s_mean']:.1f}",
        ]
        for arm, s in report["summary"].items()
        if arm in ARMS
    ]
    print_table(cols, rows)
    print(f"\nrecipe: {out_dir / 'recipe.json'}  plots: {', '.join(report['plots'])}")
    return 0
