"""``treepo bench learner``: learner tokens/s and peak memory, 1 vs 2 gloo ranks, same global batch.

Both runs train the same tiny model on the same synthetic trees (the same global mini-batches); the
2-rank run gives each rank half of every mini-batch. Throughput counts trained response tokens per
second of wall time over the measured steps (after warm-up steps), best of ``--repeats`` alternating
runs (other load on the machine only ever slows a run down); memory is each rank's peak RSS
(``resource.getrusage``), which includes the Python/torch baseline. Ranks run as processes spawned
by torch.multiprocessing with the gloo backend on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

from cluster.bench.report import emit_json, print_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="", help="Model directory (default: build a random-init tiny model)."
    )
    parser.add_argument(
        "--size", default="xs", choices=("xs", "s", "m"), help="Tiny model size when --model is not given."
    )
    parser.add_argument(
        "--prompts", type=int, default=8, help="Prompts per global mini-batch (one optimizer step)."
    )
    parser.add_argument("--leaves", type=int, default=8, help="Leaves per prompt (w).")
    parser.add_argument("--depth", type=int, default=4, help="Segments per leaf.")
    parser.add_argument("--segment", type=int, default=32, help="Tokens per segment.")
    parser.add_argument("--prompt-len", type=int, default=32, help="Prompt tokens.")
    parser.add_argument("--micro-batch-tokens", type=int, default=2048, help="learner.micro_batch_tokens.")
    parser.add_argument("--steps", type=int, default=3, help="Measured optimizer steps.")
    parser.add_argument("--warmup", type=int, default=1, help="Unmeasured steps first.")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per rank (0 = cores / ranks). 1 models one device per rank and avoids OpenMP "
        "contention, which made 2 threads ~8x slower than 1 on a loaded 2-core box.",
    )
    parser.add_argument("--ranks", default="1,2", help="Comma-separated world sizes to measure.")
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="Alternating repeats of every world size; the best run of each is reported.",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, model_dir: str, out: str) -> None:
    import torch

    from common.config import AlgoConfig, LearnerConfig, ModelConfig
    from learner.advantages import tree_advantages
    from learner.batching import leaf_sequences, synthetic_trees
    from learner.rank import LearnerRank

    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    lcfg = LearnerConfig(
        prompts_per_step=args.prompts,
        mini_batch_prompts=args.prompts,
        micro_batch_tokens=args.micro_batch_tokens,
    )
    r = LearnerRank(
        ModelConfig(path=model_dir),
        AlgoConfig(),
        lcfg,
        rank=rank,
        world_size=world,
        init_method=f"tcp://127.0.0.1:{port}",
    )
    vocab = int(r.module.config.vocab_size)
    tokens, elapsed = 0, 0.0
    shape = dict(w=args.leaves, depth=args.depth, seg_len=args.segment, prompt_len=args.prompt_len)
    for step in range(args.warmup + args.steps):
        trees = synthetic_trees(args.prompts, vocab_size=vocab, seed=step, **shape)
        adv = tree_advantages(trees, AlgoConfig())
        share = slice(rank * args.prompts // world, (rank + 1) * args.prompts // world)
        seqs = leaf_sequences(trees[share], adv[share])
        r.barrier()
        t0 = time.perf_counter()
        r.train_on([seqs])
        r.barrier()
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            elapsed += dt
            tokens += sum(s.response_len for s in leaf_sequences(trees, adv))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"tokens": tokens, "seconds": elapsed, "peak_rss_mib": peak_mib})
    )
    r.close()


def _measure(world: int, args: argparse.Namespace, model_dir: str, scratch: str) -> dict:
    import torch.multiprocessing as mp

    out = tempfile.mkdtemp(dir=scratch)
    mp.start_processes(
        _worker, args=(world, _free_port(), args, model_dir, out), nprocs=world, start_method="spawn"
    )
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    seconds = max(x["seconds"] for x in ranks)
    return {
        "ranks": world,
        "tokens": ranks[0]["tokens"],
        "seconds": round(seconds, 3),
        "tokens_per_s": round(ranks[0]["tokens"] / seconds, 1),
        "peak_rss_mib_per_rank": [round(x["peak_rss_mib"], 1) for x in ranks],
    }


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="treepo-bench-learner-") as scratch:
        model_dir = args.model
        if not model_dir:
            from common.tiny import make_tiny_model

            model_dir = str(
                make_tiny_model(Path(scratch) / "tiny", task="arith", size=args.size, progress=False)
            )
        worlds = [int(x) for x in args.ranks.split(",")]
        # alternate the world sizes so that load from other processes hits both alike; keep the best
        runs: dict[int, list[dict]] = {w: [] for w in worlds}
        for _ in range(max(1, args.repeats)):
            for w in worlds:
                runs[w].append(_measure(w, args, model_dir, scratch))
    results = []
    for w in worlds:
        best = max(runs[w], key=lambda r: r["tokens_per_s"])
        best["all_tokens_per_s"] = [r["tokens_per_s"] for r in runs[w]]
        results.append(best)
    base = results[0]["tokens_per_s"]
    for r in results:
        r["ratio_vs_first"] = round(r["tokens_per_s"] / base, 3)
    report = {
        "bench": "learner",
        "model": args.model or f"tiny:{args.size} (random init)",
        "global_batch": {
            "prompts": args.prompts,
            "leaves": args.leaves,
            "response_tokens": args.depth * args.segment,
        },
        "cpu_count": os.cpu_count(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "results": results,
    }
    emit_json(report, indent=1)
    columns = [("ranks", 5), ("tokens/s", 10), ("seconds", 8), ("peak RSS MiB/rank", 20), ("ratio", 6)]
    rows = [
        [r["ranks"], f"{r['tokens_per_s']:.1f}", f"{r['seconds']:.2f}"]
        + ["/".join(f"{x:.0f}" for x in r["peak_rss_mib_per_rank"]), f"{r['ratio_vs_first']:.3f}"]
        for r in results
    ]
    print_table(columns, rows, left=0, sep=" ")
    sys.stdout.flush()
    return 0
