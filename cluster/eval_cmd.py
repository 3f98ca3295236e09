"""``treepo eval``: k answers per problem (flat or tree sampling) on one or more benchmark files;
mean@k, pass@k and maj@k per file and overall (weighted by problem count), with tokens decoded,
wall time and trajectories/s. Writes a table, ``summary.json`` and ``<file>.problems.jsonl``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


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


def run(args: argparse.Namespace) -> int:
    from common.config import load_config
    from common.errors import ConfigError

    if args.k < 1:
        raise ConfigError(f"--k={args.k}: pass k >= 1")
    cfg = load_config(args.config, [*args.overrides, f"model.path={args.model}"])

    from tqdm import tqdm

    from actors.backends import make_backend
    from actors.evaluator import evaluate
    from common.data import load_prompts, resolve_data_path
    from common.models import eos_token_ids, load_tokenizer, resolve_model_path
    from common.rewards import resolve_reward

    model = resolve_model_path(
        cfg.model.path, tiny_size=cfg.model.tiny_size, tiny_warmup_steps=cfg.model.tiny_warmup_steps
    )
    tok = load_tokenizer(model)
    eos = eos_token_ids(model)
    files = []
    for spec in args.data:
        path, task = resolve_data_path(spec, "eval", cfg.data)
        prompts = list(load_prompts(path, tok, cfg.data))
        if args.max_problems:
            prompts = prompts[: args.max_problems]
        files.append((spec, path, task, prompts))
    max_len = max(len(p.prompt_ids) for *_, ps in files for p in ps) + cfg.tree.max_response_tokens + 8
    backend = make_backend(
        None,
        model,
        cfg.generators,
        cfg.sampling,
        dtype=cfg.model.dtype,
        eos_ids=eos,
        seed=cfg.seed,
        max_model_len=max_len,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict[str, float]] = {}
    try:
        for spec, path, task, prompts in files:
            reward = resolve_reward(cfg.reward.fn, task, cfg=cfg.reward)
            with tqdm(total=len(prompts), desc=Path(str(path)).name, dynamic_ncols=True) as bar:
                res = evaluate(
                    backend, prompts, reward, tree_cfg=cfg.tree, sampling_cfg=cfg.sampling, eos_ids=eos,
                    decode=lambda ids: tok.decode(list(ids), skip_special_tokens=True), k=args.k,
                    sampling=args.sampling, max_in_flight=cfg.generators.trees_in_flight, keep_texts=True,
                    progress=bar.update,
                )  # fmt: skip
            summary[spec] = res.summary()
            with open(out / f"{Path(str(path)).stem}.problems.jsonl", "w") as fh:
                for p in res.problems:
                    fh.write(json.dumps(p.__dict__) + "\n")
    finally:
        backend.close()
    total = sum(s["problems"] for s in summary.values())
    overall = {
        key: sum(s[key] * s["problems"] for s in summary.values()) / total
        for key in (f"mean@{args.k}", f"pass@{args.k}", f"maj@{args.k}")
    }
    overall.update(
        problems=total,
        decoded_tokens=sum(s["decoded_tokens"] for s in summary.values()),
        wall_s=sum(s["wall_s"] for s in summary.values()),
    )
    overall["trajectories_per_s"] = total * args.k / overall["wall_s"] if overall["wall_s"] else 0.0
    summary["overall"] = overall
    (out / "summary.json").write_text(
        json.dumps({"model": model, "sampling": args.sampling, "k": args.k, "results": summary}, indent=2)
    )
    cols = [
        "problems",
        f"mean@{args.k}",
        f"pass@{args.k}",
        f"maj@{args.k}",
        "decoded_tokens",
        "wall_s",
        "trajectories_per_s",
    ]
    width = max(len(n) for n in summary) + 2
    print(f"{'file':<{width}}" + "".join(f"{c:>18}" for c in cols))
    for name, s in summary.items():
        print(f"{name:<{width}}" + "".join(f"{s[c]:>18.4g}" for c in cols))
    print(json.dumps({"sampling": args.sampling, "k": args.k, "results": summary}))
    return 0
