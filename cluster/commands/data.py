"""``treepo make-data``: write a synthetic task's train and held-out splits as jsonl."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="arith", help="Synthetic task name.")
    p.add_argument(
        "--out", required=True, help="Output directory: train.jsonl and eval.jsonl are written there."
    )
    p.add_argument("--train-size", type=int, default=2000, help="Rows in the train split.")
    p.add_argument("--eval-size", type=int, default=200, help="Rows in the held-out split.")
    p.add_argument("--seed", type=int, default=1234, help="Generation seed (same seed, same rows).")


def run(args: argparse.Namespace) -> int:
    from common.errors import ConfigError
    from common.tasks import generate, write_jsonl

    if args.train_size < 1 or args.eval_size < 1:
        raise ConfigError("--train-size and --eval-size must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.train_size), ("eval", args.eval_size)):
        path = out / f"{split}.jsonl"
        write_jsonl(generate(args.task, n, args.seed, split), path)
        print(f"{split}: {n} rows -> {path}")
    return 0
