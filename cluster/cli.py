"""The ``treepo`` command line (also ``python -m cluster``).

Each subcommand lives in its own module of ``cluster/commands/`` exposing ``add_arguments(parser)``
and ``run(args) -> int``; modules are imported when their subcommand is parsed so ``treepo --help``
stays fast and needs no torch, ray or vllm import. Errors of the project's own hierarchy print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cluster.signals import sigterm_as_exit
from common.errors import TreepoError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "cluster.commands.train",
        "Run RL training (no arguments: the CPU demo on the embedded defaults).",
    ),
    "sample": (
        "cluster.commands.sample",
        "Inference-only tree sampling over a dataset with an existing model.",
    ),
    "eval": (
        "cluster.commands.eval",
        "Score a model or checkpoint on benchmark files (mean@k, pass@k, maj@k).",
    ),
    "bench": (
        "cluster.commands.bench",
        "Benchmarks (JSON and a table, ratios against a baseline in the same run): sampling, learner, sync, queue, eval, pipeline, recipe.",
    ),
    "make-tiny-model": (
        "cluster.commands.tiny",
        "Build a tiny Qwen2 model and tokenizer offline, optionally warm-started on a task.",
    ),
    "make-data": ("cluster.commands.data", "Write a synthetic task's train and held-out splits as jsonl."),
    "convert-bench": (
        "cluster.commands.convert",
        "Convert public benchmark files (MATH500, AIME, AMC, Minerva, OlympiadBench; jsonl/parquet) to eval rows.",
    ),
    "merge-lora": (
        "cluster.commands.merge_lora",
        "Merge a LoRA adapter (a learner.lora checkpoint's adapter/) into its base model: an HF model directory.",
    ),
    "plan": (
        "cluster.commands.plan",
        "Memory plan of a config per GPU (engine, learner rank, weight sync, checkpoint); train refuses one that does not fit.",
    ),
    "queue": (
        "cluster.commands.queue",
        "Inspect the replay queue: both streams, pending entries, dead letters, prompt cursor.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="treepo",
        description="Asynchronous TreePO post-training: segment-tree sampling, a durable replay queue, tree advantages.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come on both sides of flags (`x=1 --resume y=2`): argparse fills a
    # positional list once, so the later ones arrive here
    if extra and isinstance(getattr(args, "overrides", None), list):
        unknown = [a for a in extra if a.startswith("-") or "=" not in a]
        if not unknown:
            args.overrides.extend(extra)
            extra = []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        with sigterm_as_exit():
            return int(args._run(args) or 0)
    except TreepoError as e:
        print(f"treepo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"treepo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
