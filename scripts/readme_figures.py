"""Re-measure the README's figure blocks: run the commands behind each, print each block as Markdown
with the commit and machine it came from.

    python scripts/readme_figures.py                       # every block: the demo and TreePO vs GRPO
    python scripts/readme_figures.py --only recipe         # one block
    python scripts/readme_figures.py --reuse               # print again from the runs already under --out

Blocks (each names its command in the README):

- ``demo``: ``treepo train`` (the CPU demo) for every model build (``model.tiny_seed``, ``--builds``)
  and thread count (``OMP_NUM_THREADS``, ``--threads``): ranges over the runs. A build not cached yet
  is made by the first run that needs it, so its time is inside that run's "whole command".
- ``recipe``: ``treepo bench recipe --seeds 3 learner.total_steps=12 eval.every_steps=4
  eval.max_problems=64 eval.k=2`` for every model build: per arm, ranges over builds of the means
  over seeds, and the treepo/grpo ratios.
- ``long``: ``treepo bench recipe --config configs/long.yaml --seeds 3 driver=ray`` on the long
  preset's model (build 0: its warm-start takes 15-40 minutes once): per arm the held-out accuracy,
  decoded tokens, training and whole-command wall time with the treepo/grpo ratios, and where a
  step's time goes (waiting for trees, the learner step, the weight push).

Timing figures need a quiet machine: run nothing else meanwhile. The whole script takes about an hour
on 2 cores (six demo runs, three recipe runs); ``--only`` and ``--builds`` make it shorter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RECIPE_ARGS = [
    "--seeds",
    "3",
    "learner.total_steps=12",
    "eval.every_steps=4",
    "eval.max_problems=64",
    "eval.k=2",
]
DEMO_EVAL_K = 4  # the demo's eval.k: its held-out accuracy is eval/mean@4
LONG_ARGS = ["--config", "configs/long.yaml", "--seeds", "3", "driver=ray"]
PHASES = {
    "timing/generate_s": "waiting for trees",
    "timing/train_s": "learner step",
    "timing/sync_s": "weight push",
}


def _rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line
    return sorted(rows, key=lambda r: r.get("step", 0))


def _span(values: list[float], fmt: str = "{:.2f}") -> str:
    """'a–b' over ``values`` (one value when they agree at this precision)."""
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True
    )
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def _run(cmd: list[str], log: Path, threads: int) -> float:
    """Run ``cmd`` from the repository with ``OMP_NUM_THREADS=threads``; its wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    print(f"[figures] {' '.join(cmd[2:])}  (OMP_NUM_THREADS={threads}; log {log})", flush=True)
    t0 = time.monotonic()
    with open(log, "w") as out:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"readme_figures: the command failed (exit {rc}): see {log}")
    return time.monotonic() - t0


def _build_info(seed: int) -> dict[str, Any]:
    """The cached demo build of ``seed`` (its treepo_tiny.json)."""
    sys.path.insert(0, str(REPO))
    from common.config import ModelConfig
    from common.models import resolve_model

    return json.loads((Path(resolve_model(ModelConfig(tiny_seed=seed))) / "treepo_tiny.json").read_text())


def demo(out: Path, builds: list[int], threads: list[int], reuse: bool) -> str:
    runs = []
    for seed in builds:
        for t in threads:
            run_dir = out / f"demo-s{seed}-t{t}"
            wall_file = run_dir.with_suffix(".wall")
            if not (reuse and wall_file.exists()):
                cmd = [
                    sys.executable,
                    "-m",
                    "cluster",
                    "train",
                    f"run_dir={run_dir}",
                    f"model.tiny_seed={seed}",
                ]
                if run_dir.exists():
                    raise SystemExit(f"readme_figures: {run_dir} exists: remove it or pass --reuse")
                wall_file.parent.mkdir(parents=True, exist_ok=True)
                wall_file.write_text(str(_run(cmd, out / f"demo-s{seed}-t{t}.log", t)))
            runs.append((seed, t, float(wall_file.read_text()), _rows(run_dir / "metrics.jsonl")))
    key = f"eval/mean@{DEMO_EVAL_K}"
    evals = [[r for r in rows if key in r] for *_, rows in runs]
    steps = [[r for r in rows if "tree/leaf_depth_mean" in r] for *_, rows in runs]
    last = max(r["step"] for r in steps[0])
    infos = [_build_info(s) for s in builds]

    def over_steps(name: str) -> str:
        means = [_mean([r[name] for r in s]) for s in steps]
        each = [r[name] for s in steps for r in s]
        return f"{_span(means)} ({_span(each)})"

    def rollout(lo: int, hi: int) -> list[float]:
        return [_mean([r["rollout/accuracy"] for r in s if lo <= r["step"] <= hi]) for s in steps]

    lines = [
        f"| | range over the {len(runs)} runs |",
        "|---|---|",
        f"| warm-start (once per build) | {_span([i['warmup_steps_run'] for i in infos], '{:.0f}')} steps, "
        f"{_span([i['warmup_seconds'] / 60 for i in infos], '{:.1f}')} minutes |",
        f"| held-out accuracy `{key}`, step 0 → {last} | {_span([e[0][key] for e in evals])} → "
        f"{_span([e[-1][key] for e in evals])} |",
        f"| boxed held-out answers `eval/answered`, step 0 → {last} | "
        f"{_span([e[0]['eval/answered'] for e in evals])} → {_span([e[-1]['eval/answered'] for e in evals])} |",
        f"| rollout accuracy on new problems, steps 1–10 → {last - 19}–{last} | {_span(rollout(1, 10))} → "
        f"{_span(rollout(last - 19, last))} |",
        f"| mean leaf depth `tree/leaf_depth_mean` (mean over steps; min–max of a step) | "
        f"{over_steps('tree/leaf_depth_mean')} |",
        f"| decoded / flat tokens `tree/decoded_vs_flat` (mean over steps; min–max of a step) | "
        f"{over_steps('tree/decoded_vs_flat')} |",
        f"| {last} steps | {_span([sum(r.get('timing/step_s', 0) for r in s) / 60 for s in steps], '{:.1f}')} minutes |",
        f"| the whole command (`OMP_NUM_THREADS={threads[0]}`; a build's first run includes it) | "
        f"{_span([w / 60 for _, t, w, _ in runs if t == threads[0]], '{:.1f}')} minutes |",
    ]
    cmd = f"`bash scripts/demo.sh model.tiny_seed=S` for S in {builds} × OMP_NUM_THREADS in {threads}"
    return _block("demo", cmd, lines)


def recipe(out: Path, builds: list[int], reuse: bool) -> str:
    reports = []
    for seed in builds:
        out_dir = out / f"recipe-s{seed}"
        if not (reuse and (out_dir / "recipe.json").exists()):
            cmd = [sys.executable, "-m", "cluster", "bench", "recipe", *RECIPE_ARGS]
            cmd += ["--out-dir", str(out_dir), f"model.tiny_seed={seed}"]
            _run(cmd, out / f"recipe-s{seed}.log", 2)
        reports.append((out_dir, json.loads((out_dir / "recipe.json").read_text())))
    lines = [
        "| arm | held-out accuracy step 0 → 12 (mean over seeds; range over builds) | final, min–max over "
        "every seed | decoded tokens (12 steps) | training wall s | mean leaf depth | decoded / flat tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in ("treepo", "grpo"):
        s = [r["summary"][arm] for _, r in reports]
        depth, ratio = [], []
        for out_dir, r in reports:
            for seed in range(r["seeds"]):
                rows = [
                    x
                    for x in _rows(out_dir / f"{arm}-seed{seed}" / "metrics.jsonl")
                    if "tree/leaf_depth_mean" in x
                ]
                depth.append(_mean([x["tree/leaf_depth_mean"] for x in rows]))
                ratio.append(_mean([x["tree/decoded_vs_flat"] for x in rows]))
        tokens, wall = [x["decoded_tokens_mean"] for x in s], [x["wall_s_mean"] for x in s]
        if arm == "treepo":
            ratios = [r["summary"]["treepo_over_grpo"] for _, r in reports]
            tokens_cell = f"{_span(tokens, '{:.0f}')} ({_span([x['decoded_tokens'] for x in ratios])}× GRPO)"
            wall_cell = f"{_span(wall, '{:.1f}')} ({_span([x['wall_s'] for x in ratios])}× GRPO)"
        else:
            tokens_cell, wall_cell = _span(tokens, "{:.0f}"), _span(wall, "{:.1f}")
        lines.append(
            f"| {arm} | {_span([x['first_accuracy_mean'] for x in s])} → {_span([x['final_accuracy_mean'] for x in s])} "
            f"| {_span([x['final_accuracy_min'] for x in s] + [x['final_accuracy_max'] for x in s])} "
            f"| {tokens_cell} | {wall_cell} | {_span(depth)} | {_span(ratio)} |"
        )
    diffs = [r["summary"]["treepo_over_grpo"]["final_accuracy_diff"] for _, r in reports]
    lines.append("")
    lines.append(
        f"final accuracy, treepo − grpo (mean over seeds), per build {builds}: "
        + ", ".join(f"{d:+.3f}" for d in diffs)
    )
    cmd = f"`treepo bench recipe {' '.join(RECIPE_ARGS)} model.tiny_seed=S` for S in {builds}"
    return _block("recipe", cmd, lines)


def long(out: Path, reuse: bool) -> str:
    out_dir = out / "long"
    if not (reuse and (out_dir / "recipe.json").exists()):
        cmd = [sys.executable, "-m", "cluster", "bench", "recipe", *LONG_ARGS, "--out-dir", str(out_dir)]
        _run(cmd, out / "long.log", 2)
    report = json.loads((out_dir / "recipe.json").read_text())
    lines = [
        "| arm | held-out accuracy first → final (mean; min–max over seeds) | decoded tokens | training wall s "
        "| whole command s | decoded / flat tokens | per step: " + " · ".join(PHASES.values()) + " (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    ratios = report["summary"]["treepo_over_grpo"]
    for arm in ("treepo", "grpo"):
        s = report["summary"][arm]
        rows = [
            x
            for seed in range(report["seeds"])
            for x in _rows(out_dir / f"{arm}-seed{seed}" / "metrics.jsonl")
            if "timing/step_s" in x
        ]
        phases = " · ".join(f"{_mean([x.get(k, 0.0) for x in rows]):.2f}" for k in PHASES)
        vs = {k: f" ({ratios[k]:.2f}× GRPO)" if arm == "treepo" else "" for k in ratios}
        lines.append(
            f"| {arm} | {s['first_accuracy_mean']:.2f} → {s['final_accuracy_mean']:.2f} "
            f"({s['final_accuracy_min']:.2f}–{s['final_accuracy_max']:.2f}) "
            f"| {s['decoded_tokens_mean']:.0f}{vs['decoded_tokens']} | {s['wall_s_mean']:.1f}{vs['wall_s']} "
            f"| {s['command_wall_s_mean']:.1f}{vs['command_wall_s']} "
            f"| {_mean([x['tree/decoded_vs_flat'] for x in rows if 'tree/decoded_vs_flat' in x]):.2f} | {phases} |"
        )
    return _block("long", f"`treepo bench recipe {' '.join(LONG_ARGS)}`", lines)


def _block(name: str, command: str, lines: list[str]) -> str:
    head = f"<!-- figures:{name} · {_commit()} · {_machine()} · {time.strftime('%Y-%m-%d')} -->"
    return "\n".join([head, f"Command: {command}", "", *lines])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="demo,recipe", help="Comma-separated blocks: demo, recipe, long.")
    p.add_argument("--builds", default="0,1,2", help="Model builds (model.tiny_seed), comma-separated.")
    p.add_argument(
        "--threads",
        default="2,1",
        help="OMP_NUM_THREADS values of the demo runs; the first times the whole command.",
    )
    p.add_argument("--out", default="runs/figures", help="Where the runs go.")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="Print from runs already under --out instead of running them again.",
    )
    args = p.parse_args(argv)
    blocks = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(blocks) - {"demo", "recipe", "long"})
    if unknown:
        p.error(f"unknown block(s) {unknown}: choose among demo, recipe, long")
    try:
        builds = [int(x) for x in args.builds.split(",")]
        threads = [int(x) for x in args.threads.split(",")]
    except ValueError:
        p.error("--builds and --threads take comma-separated integers, e.g. --builds 0,1,2")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    printed = []
    if "recipe" in blocks:
        printed.append(recipe(out, builds, args.reuse))
    if "long" in blocks:
        printed.append(long(out, args.reuse))
    if "demo" in blocks:
        printed.append(demo(out, builds, threads, args.reuse))
    print("\n\n".join(printed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
