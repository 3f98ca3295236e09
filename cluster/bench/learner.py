"""``treepo bench learner``: the learner's packing (default) or its data parallelism (``--compare ranks``).

``--compare packing``: per-leaf padded rows (``learner.packing=none``) vs padding-free rows (``flat``) vs
tree-packed rows (``tree``) on the same tiny model and the same synthetic trees, for each shape of
``--shapes`` (the demo's tree and scaled paper shapes: w=16, b=2, d in {4, 7, 14}, and trees/flat
samples whose leaves end early so lengths vary). Per packing: the median wall time of one learner
step (π_prox forward + forward/backward + optimizer step on one mini-batch), the model positions the
update computes (padding included), and the peak memory of the step (CUDA: peak allocated; CPU: the
process's peak RSS above its RSS before the first step; every (shape, packing) runs in its own
spawned process so peaks do not mix). Ratios are against padded in the same run, next to the analytic
distinct-token ratio (tokens of the prefix trees / tokens of the leaves, prompts included). Runs
alternate packings and repeat (``--repeats``); the best median of each is reported.

``--compare ranks``: learner tokens/s and peak memory, 1 vs 2 gloo ranks, same global batch.
Both runs train the same tiny model on the same synthetic trees (the same global mini-batches); the
2-rank run gives each rank half of every mini-batch. Throughput counts trained response tokens per
second of wall time over the measured steps (after warm-up steps), best of ``--repeats`` alternating
runs (other load on the machine only ever slows a run down); memory is each rank's peak RSS
(``resource.getrusage``), which includes the Python/torch baseline. Ranks run as processes spawned
by torch.multiprocessing with the gloo backend on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cluster.bench.report import add_bench_arguments, emit_json, model_label, print_table, ratio
from cluster.config_args import load_args_config, requested_overrides
from common.config import TrainConfig
from common.errors import ConfigError
from common.models import resolve_model
from learner.advantages import tree_advantages

# name -> synthetic_trees arguments and prompts per step (smaller for the long paper shapes)
SHAPES: dict[str, dict] = {
    "demo": dict(w=8, depth=4, seg_len=32, prompt_len=32, prompts=8),
    "w16-d4": dict(w=16, depth=4, seg_len=32, prompt_len=32, prompts=4),
    "w16-d7": dict(w=16, depth=7, seg_len=32, prompt_len=32, prompts=2),
    "w16-d14": dict(w=16, depth=14, seg_len=32, prompt_len=32, prompts=1),
    "w16-d4-eos": dict(w=16, depth=4, seg_len=32, prompt_len=32, prompts=4, stop_prob=0.3),
    "flat16-eos": dict(w=16, depth=4, seg_len=32, prompt_len=32, prompts=4, flat=True, stop_prob=0.3),
}
PACKINGS = ("none", "flat", "tree")


# the bench's own settings (used without --config): a random-init tiny model of size "s"; for
# --compare ranks, trees of 8 leaves x 4 segments x 32 tokens (8 prompts per optimizer step)
DEFAULTS = ["model.path=tiny:arith", "model.tiny_warmup_steps=0", "tree.w=8", "tree.d=4", "tree.l=32"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compare",
        default="packing",
        choices=("packing", "ranks"),
        help="packing: padded vs padding-free vs tree-packed rows; ranks: 1 vs 2 gloo ranks.",
    )
    parser.add_argument(
        "--shapes",
        default=",".join(SHAPES),
        help=f"Comma-separated tree shapes for --compare packing, of: {', '.join(SHAPES)}.",
    )
    parser.add_argument("--prompt-len", type=int, default=32, help="Prompt tokens (--compare ranks).")
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
    add_bench_arguments(
        parser,
        DEFAULTS,
        overrides_help="Config overrides: model.* (the model), learner.* (micro_batch_tokens, "
        "gpus_per_worker=1: --compare packing on one GPU, cuda:0; prompts_per_step: prompts per optimizer "
        "step of --compare ranks), algo.*, and for --compare ranks the synthetic trees' shape (tree.w "
        "leaves, tree.d segments of tree.l tokens).",
    )


def load_bench_config(args: argparse.Namespace) -> TrainConfig:
    cfg = load_args_config(args, DEFAULTS)
    if args.compare == "ranks" and cfg.learner.gpus_per_worker:
        raise ConfigError(
            "--compare ranks measures gloo ranks on CPU: set learner.gpus_per_worker=0 "
            "(--compare packing measures one GPU)"
        )
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, cfg: TrainConfig, out: str) -> None:
    # torch and the learner: loaded in the spawned rank only (`treepo --help` imports this module)
    import torch

    from learner.batching import leaf_sequences
    from learner.rank import LearnerRank
    from learner.synthetic import synthetic_trees

    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    r = LearnerRank(
        cfg.model, cfg.algo, cfg.learner, rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}"
    )
    vocab = int(r.module.config.vocab_size)
    tokens, elapsed = 0, 0.0
    prompts = cfg.learner.prompts_per_step
    shape = dict(w=cfg.tree.w, depth=cfg.tree.d, seg_len=cfg.tree.l, prompt_len=args.prompt_len)
    for step in range(args.warmup + args.steps):
        trees = synthetic_trees(prompts, vocab_size=vocab, seed=step, **shape)
        adv = tree_advantages(trees, cfg.algo)
        mb = cfg.learner.mini_batch_prompts  # this rank's share of every mini-batch
        shares = [slice(j + rank * mb // world, j + (rank + 1) * mb // world) for j in range(0, prompts, mb)]
        mini_batches = [leaf_sequences(trees[s], adv[s]) for s in shares]
        r.barrier()
        t0 = time.perf_counter()
        r.train_on(mini_batches)
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


def _measure(world: int, args: argparse.Namespace, cfg: TrainConfig, scratch: str) -> dict:
    import torch.multiprocessing as mp  # torch: only when the bench runs (`treepo --help` needs none)

    out = tempfile.mkdtemp(dir=scratch)
    mp.start_processes(
        _worker, args=(world, _free_port(), args, cfg, out), nprocs=world, start_method="spawn"
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


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _shape_trees(shape: dict, step: int, vocab: int):
    kw = {k: v for k, v in shape.items() if k != "prompts"}
    return synthetic_trees_for(shape["prompts"], vocab, step, kw)


def synthetic_trees_for(prompts: int, vocab: int, seed: int, kw: dict):
    from learner.synthetic import synthetic_trees

    return synthetic_trees(prompts, vocab_size=vocab, seed=seed, **kw)


def _packing_worker(_: int, name: str, packing: str, args: argparse.Namespace, cfg: TrainConfig, out: str):
    # torch and the learner: loaded in the spawned process only (`treepo --help` imports this module)
    import torch

    from learner.batching import leaf_sequences
    from learner.rank import LearnerRank

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    shape = SHAPES[name]
    gpu = cfg.learner.gpus_per_worker > 0
    lcfg = dataclasses.replace(
        cfg.learner, prompts_per_step=shape["prompts"], mini_batch_prompts=shape["prompts"], packing=packing
    )
    r = LearnerRank(cfg.model, cfg.algo, lcfg)
    vocab = int(r.module.config.vocab_size)
    base = _rss_mib()
    times, tokens = [], 0.0
    for step in range(args.warmup + args.steps):
        trees = _shape_trees(shape, step, vocab)
        seqs = leaf_sequences(trees, tree_advantages(trees, cfg.algo))
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        metrics = r.train_on([seqs])
        if gpu:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            tokens += metrics["learner/forward_tokens"]
    if gpu:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    result = {"times": times, "tokens": tokens / max(1, args.steps), "peak_mib": peak}
    Path(out).write_text(json.dumps(result))


def _distinct_ratio(shape: dict, args: argparse.Namespace, vocab: int) -> float:
    """Tokens of the prefix trees / tokens of the leaves (prompts included), over the measured steps."""
    # torch (through the learner's packing): only when the bench runs (`treepo --help` needs none)
    from learner.batching import leaf_sequences
    from learner.packing import computed_tokens

    distinct = leaves = 0
    for step in range(args.warmup, args.warmup + args.steps):
        for tree in _shape_trees(shape, step, vocab):
            seqs = leaf_sequences([tree], [np.zeros(len(tree.leaves))])
            distinct += computed_tokens(seqs, "tree")
            leaves += computed_tokens(seqs, "flat")
    return distinct / leaves


def _packing_rows(args: argparse.Namespace, cfg: TrainConfig, scratch: str) -> list[dict]:
    import torch.multiprocessing as mp  # torch: only when the bench runs (`treepo --help` needs none)

    names = [n for n in args.shapes.split(",") if n]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}: choose from {', '.join(SHAPES)}")
    vocab = int(json.loads(Path(cfg.model.path, "config.json").read_text())["vocab_size"])
    rows = []
    for name in names:
        runs: dict[str, list[dict]] = {p: [] for p in PACKINGS}
        for rep in range(max(1, args.repeats)):
            for packing in PACKINGS:  # alternate, so that outside load hits every packing alike
                out = str(Path(scratch, f"{name}-{packing}-{rep}.json"))
                mp.start_processes(
                    _packing_worker,
                    args=(name, packing, args, cfg, out),
                    nprocs=1,
                    start_method="spawn",
                )
                runs[packing].append(json.loads(Path(out).read_text()))
        ratio_bound = _distinct_ratio(SHAPES[name], args, vocab)
        rows.extend(_shape_rows(name, runs, ratio_bound))
    return rows


def _shape_rows(name: str, runs: dict[str, list[dict]], distinct: float) -> list[dict]:
    rows = []
    for packing in PACKINGS:
        medians = [statistics.median(r["times"]) for r in runs[packing]]
        best = min(range(len(medians)), key=medians.__getitem__)
        rows.append(
            {
                "shape": name,
                **{k: v for k, v in SHAPES[name].items()},
                "packing": packing,
                "step_s": round(medians[best], 4),
                "step_s_all": [round(m, 4) for m in medians],
                "tokens_computed": runs[packing][best]["tokens"],
                "peak_mib": round(max(r["peak_mib"] for r in runs[packing]), 1),
                "distinct_token_ratio": round(distinct, 4),
            }
        )
    base = rows[0]
    for row in rows:
        row["time_vs_padded"] = round(ratio(row["step_s"], base["step_s"]), 3)
        row["tokens_vs_padded"] = round(ratio(row["tokens_computed"], base["tokens_computed"]), 3)
        row["memory_vs_padded"] = round(ratio(row["peak_mib"], base["peak_mib"]), 3)
        if row["packing"] == "tree":
            row["target"] = f"<= {distinct + 0.10:.3f}"
            row["meets_target"] = row["time_vs_padded"] <= distinct + 0.10
        elif row["packing"] == "flat" and SHAPES[name].get("stop_prob"):
            row["target"] = "<= 0.800"
            row["meets_target"] = row["time_vs_padded"] <= 0.8
    return rows


def _run_packing(args: argparse.Namespace, cfg: TrainConfig, scratch: str) -> int:
    rows = _packing_rows(args, cfg, scratch)
    report = {
        "bench": "learner",
        "compare": "packing",
        **_config_echo(args, cfg),
        "device": "cuda" if cfg.learner.gpus_per_worker else "cpu",
        "threads": args.threads or os.cpu_count(),
        "micro_batch_tokens": cfg.learner.micro_batch_tokens,
        "steps": args.steps,
        "cpu_count": os.cpu_count(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "results": rows,
    }
    emit_json(report, args.json, indent=1)
    columns = [
        ("shape", 11),
        ("packing", 8),
        ("step s", 8),
        ("tokens", 8),
        ("peak MiB", 9),
        ("time/pad", 9),
        ("tok/pad", 8),
        ("mem/pad", 8),
        ("distinct", 9),
        ("target", 9),
        ("met", 4),
    ]
    table = [
        [
            r["shape"],
            r["packing"],
            f"{r['step_s']:.3f}",
            f"{r['tokens_computed']:.0f}",
            f"{r['peak_mib']:.0f}",
        ]
        + [f"{r['time_vs_padded']:.3f}", f"{r['tokens_vs_padded']:.3f}", f"{r['memory_vs_padded']:.3f}"]
        + [f"{r['distinct_token_ratio']:.3f}", r.get("target", ""), _met(r)]
        for r in rows
    ]
    print_table(columns, table, left=2, sep=" ")
    sys.stdout.flush()
    return 0


def _met(row: dict) -> str:
    if "meets_target" not in row:
        return ""
    return "yes" if row["meets_target"] else "NO"


def _config_echo(args: argparse.Namespace, cfg: TrainConfig) -> dict:
    """The report's account of the config: preset, overrides and the model measured."""
    return {
        "preset": args.config,
        "overrides": requested_overrides(args, DEFAULTS),
        "model": model_label(cfg.model),
    }


def run(args: argparse.Namespace) -> int:
    cfg = load_bench_config(args)
    # resolved once here (a tiny model is built and cached) so the spawned ranks load a directory
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=resolve_model(cfg.model)))
    with tempfile.TemporaryDirectory(prefix="treepo-bench-learner-") as scratch:
        if args.compare == "packing":
            return _run_packing(args, cfg, scratch)
        return _run_ranks(args, cfg, scratch)


def _run_ranks(args: argparse.Namespace, cfg: TrainConfig, scratch: str) -> int:
    worlds = [int(x) for x in args.ranks.split(",")]
    # alternate the world sizes so that load from other processes hits both alike; keep the best
    runs: dict[int, list[dict]] = {w: [] for w in worlds}
    for _ in range(max(1, args.repeats)):
        for w in worlds:
            runs[w].append(_measure(w, args, cfg, scratch))
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
        **_config_echo(args, cfg),
        "global_batch": {
            "prompts": cfg.learner.prompts_per_step,
            "leaves": cfg.tree.w,
            "response_tokens": cfg.tree.d * cfg.tree.l,
        },
        "cpu_count": os.cpu_count(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "results": results,
    }
    emit_json(report, args.json, indent=1)
    columns = [("ranks", 5), ("tokens/s", 10), ("seconds", 8), ("peak RSS MiB/rank", 20), ("ratio", 6)]
    rows = [
        [r["ranks"], f"{r['tokens_per_s']:.1f}", f"{r['seconds']:.2f}"]
        + ["/".join(f"{x:.0f}" for x in r["peak_rss_mib_per_rank"]), f"{r['ratio_vs_first']:.3f}"]
        for r in results
    ]
    print_table(columns, rows, left=0, sep=" ")
    sys.stdout.flush()
    return 0
