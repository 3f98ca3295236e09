"""``treepo bench <name>``: each benchmark prints JSON and a table, comparing against its baseline
measured in the same run (as a ratio). Each lives in ``cluster/bench/<name>.py`` with
``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib

BENCHES: dict[str, str] = {
    "sampling": "Tree vs flat sampling on the same engine, model, prompts and seeds.",
    "learner": "Learner tokens/s and peak memory for 1 and 2 gloo ranks on the tiny model.",
    "sync": "Weight broadcast GB/s vs model size: ours vs one raw gloo broadcast vs a /dev/shm file, 1 and 2 receivers.",
    "eval": "Test-time flat vs tree sampling (b in 2,4,8): accuracy vs decoded tokens and wall time.",
    "queue": "Trees/s and push-to-read latency through the replay queue, next to redis-benchmark SET.",
    "pipeline": "Async vs synchronous pipeline trees/s on one config, idle fractions, and a synthetic workload against the ideal overlap bound.",
    "recipe": "TreePO vs GRPO (flat sampling, group advantages) at equal prompts, leaves and steps over seeds: held-out accuracy against step, decoded tokens and wall seconds (JSON + PNG).",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, help_text in BENCHES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(f"cluster.bench.{name}")
        mod.add_arguments(p)
        p.set_defaults(_bench_run=mod.run)


def run(args: argparse.Namespace) -> int:
    return int(args._bench_run(args) or 0)
