"""``treepo eval``: k answers per problem (flat or tree sampling) on one or more benchmark files;
mean@k, pass@k and maj@k per file and overall (weighted by problem count), with tokens decoded,
wall time and trajectories/s. Writes a table, ``summary.json`` and ``<file>.problems.jsonl``.

``--model`` takes a model directory, a hub id, ``tiny:<task>``, a learner checkpoint directory
(``ckpt-<step>``), a checkpoint root holding a ``latest`` pointer, or a run directory whose
``checkpoints/`` holds one: the pointer is followed to the published checkpoint. Evaluation rewards
carry no overlong penalty (``reward.overlong_buffer`` is ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from common.models import resolve_eval_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="Model directory, checkpoint directory, hub id or tiny:<task>."
    )
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="Benchmark files (.jsonl/.parquet rows {id, prompt, answer}) or synthetic:<task>.",
    )
    p.add_argument(
        "--sampling", choices=("flat", "tree"), default="flat", help="Independent samples or segment trees."
    )
    p.add_argument("--k", type=int, default=16, help="Answers per problem.")
    p.add_argument(
        "--max-problems", type=int, default=0, help="Use the first N problems of each file (0 = all)."
    )
    p.add_argument(
        "--out", default="runs/eval", help="Output directory for summary.json and per-problem jsonl."
    )
    p.add_argument(
        "--config", "-c", default=None, help="Preset YAML for the tree/sampling/generators/reward sections."
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="Config overrides, e.g. tree.d=8 tree.l=64."
    )


def _output_names(paths: list[Path]) -> list[str]:
    """Distinct per-file output stems (``name``, ``name-2`` ... when two inputs share a stem)."""
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = p.stem
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return out


def overall_summary(per_file: dict[str, dict[str, float]], k: int) -> dict[str, float]:
    """Accuracies weighted by problem count; tokens, prefill and wall time summed."""
    total = sum(s["problems"] for s in per_file.values())
    out = {
        key: sum(s[key] * s["problems"] for s in per_file.values()) / total
        for key in (f"mean@{k}", f"pass@{k}", f"maj@{k}")
    }
    out["problems"] = total
    for key in ("decoded_tokens", "prefill_tokens_computed", "trajectory_tokens", "wall_s"):
        out[key] = sum(s.get(key, 0.0) for s in per_file.values())
    out["trajectories_per_s"] = total * k / out["wall_s"] if out["wall_s"] else 0.0
    return out


COLUMNS = ("problems", "mean@{k}", "pass@{k}", "maj@{k}", "decoded_tokens", "wall_s", "trajectories_per_s")


def print_table(summary: dict[str, dict[str, float]], k: int) -> None:
    cols = [c.format(k=k) for c in COLUMNS]
    width = max(len(n) for n in summary) + 2
    print(f"{'file':<{width}}" + "".join(f"{c:>18}" for c in cols))
    for name, s in summary.items():
        print(f"{name:<{width}}" + "".join(f"{s[c]:>18.4g}" for c in cols))


def run(args: argparse.Namespace, backend: Any = None) -> int:
    """``backend``: reuse an already-open backend (tests share one engine); otherwise one is built."""
    from common.config import load_config
    from common.errors import ConfigError

    if args.k < 1:
        raise ConfigError(f"--k={args.k}: pass k >= 1")
    cfg = load_config(args.config, [*args.overrides, f"model.path={resolve_eval_model(args.model)}"])

    from tqdm import tqdm

    from actors.engine_inputs import EngineInputs
    from actors.evaluator import eval_tree_config, run_eval

    inputs = EngineInputs.load(cfg)
    model = inputs.model_path
    files = [
        inputs.prompt_set(spec, "eval", reward="eval", max_problems=args.max_problems) for spec in args.data
    ]
    if len({f.spec for f in files}) != len(files):
        raise ConfigError(
            "the same --data file is given twice: it would be counted twice in the overall numbers"
        )
    own_backend = backend is None
    if own_backend:
        backend = inputs.open_backend(*files)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict[str, float]] = {}
    outputs: dict[str, str] = {}
    try:
        for f, name in zip(files, _output_names([f.path for f in files])):
            spec = f.spec
            with tqdm(total=len(f.prompts), desc=Path(str(f.path)).name, dynamic_ncols=True) as bar:
                res = run_eval(
                    backend, inputs, f.prompts, f.reward, k=args.k, sampling=args.sampling, keep_texts=True,
                    progress=bar.update,
                )  # fmt: skip
            summary[spec] = res.summary()
            problems_file = out / f"{name}.problems.jsonl"
            with open(problems_file, "w") as fh:
                for p in res.problems:
                    fh.write(json.dumps(dataclasses.asdict(p)) + "\n")
            outputs[spec] = str(problems_file)
    finally:
        if own_backend:
            backend.close()
    summary["overall"] = overall_summary(summary, args.k)
    result = {
        "model": model,
        "sampling": args.sampling,
        "k": args.k,
        "tree": dataclasses.asdict(eval_tree_config(cfg.tree, args.k, args.sampling)),
        "results": summary,
        "problems_files": outputs,
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(summary, args.k)
    print(json.dumps({"sampling": args.sampling, "k": args.k, "results": summary}))
    return 0
