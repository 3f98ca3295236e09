"""``treepo make-tiny-model``: a tiny Qwen2 model and tokenizer built offline (no hub needed)."""

from __future__ import annotations

import argparse
import json
from typing import get_args

from common.config import TinySize


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="Output directory (Hugging Face format; written atomically).")
    p.add_argument(
        "--task", default="arith", help="Task whose vocabulary the tokenizer uses ('none' = byte-level)."
    )
    p.add_argument(
        "--size", default="s", choices=get_args(TinySize), help="Model size (head_dim 64 everywhere)."
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=0,
        help="Most supervised warm-start steps on the task (0 = random init); it stops earlier once "
        "a greedy probe solves most problems (see common/tiny.py).",
    )
    p.add_argument(
        "--unboxed-share",
        type=float,
        default=0.0,
        help="Share of warm-start solutions ending in a bare number instead of \\boxed{}, in [0, 1) "
        "(the demo model uses 0.5).",
    )
    p.add_argument("--seed", type=int, default=0, help="Seed of the initialisation and the warm-start data.")


def run(args: argparse.Namespace) -> int:
    from common.errors import ConfigError
    from common.tiny import make_tiny_model

    if args.warmup_steps < 0:
        raise ConfigError(f"--warmup-steps={args.warmup_steps} is negative: pass 0 or more")
    task = None if args.task == "none" else args.task
    if task is None and args.warmup_steps:
        raise ConfigError("--warmup-steps needs a task: pass --task arith")
    out = make_tiny_model(
        args.out,
        task=task,
        size=args.size,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        unboxed_share=args.unboxed_share,
    )
    info = out / "treepo_tiny.json"
    print(f"tiny model written to {out}")
    if info.exists():
        print(json.dumps(json.loads(info.read_text()), indent=2))
    return 0
