"""``treepo bench sync``: weight-broadcast GB/s against model size, next to two baselines, in one run.

For each receiver count (default 1 and 2) the receivers are spawned processes (torch.multiprocessing,
one torch thread each) and rank 0 is this process. For each model size (default 10, 100 and 500 MB of
float32 tensors in transformer shapes: embedding, per-layer q/k/v/o, gate/up/down, two norms), best
of ``--repeats`` (after one unmeasured warm-up send), each timed from rank 0's start until a barrier (an all-reduce) that every receiver
enters only after it has finished:

1. ours: ``WeightSender.send`` → ``WeightReceiver.receive`` with the iterator drained (bucketed,
   metadata first, packing on rank 0), on the ``sync.backend`` group (gloo here);
2. raw: the same bytes as ONE pre-packed tensor in one plain gloo broadcast on a separate group —
   the transport's ceiling on this machine;
3. shm: ``torch.save`` of the same tensors to /dev/shm, then ``torch.load`` in every receiver — the
   single-host alternative of passing a file.

GB/s = payload bytes / seconds (not multiplied by the receiver count). Ratios are ours / baseline
(> 1: ours is faster).

The transport is the run's ``sync`` section (``--config PRESET`` and ``key=value``, validated like
``treepo train``'s): ``sync.backend``, ``sync.bucket_mb``, ``sync.timeout_s``; without ``--config``
the config's defaults with ``sync.backend=gloo``. On GPU the same run measures NCCL (raw then uses NCCL
too) with a GPU preset, whose ``sync.backend=auto`` picks it (``--config qwen2.5-7b-treepo``), or
``sync.backend=nccl learner.gpus_per_worker=1 generators.gpus_per_engine=1``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import tempfile
import time

from cluster.bench.report import add_bench_arguments, emit_json, print_table
from cluster.config_args import load_args_config, requested_overrides
from common.config import TrainConfig

BENCH_HOST = "127.0.0.1"


# the bench's own setting (used without --config): gloo, also where a GPU is present
DEFAULTS = ["sync.backend=gloo"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes-mb", default="10,100,500", help="Comma-separated model sizes in MB (float32)."
    )
    parser.add_argument("--receivers", default="1,2", help="Comma-separated receiver counts.")
    parser.add_argument(
        "--repeats", type=int, default=2, help="Repeats per measurement; the best is reported."
    )
    parser.add_argument("--no-shm", action="store_true", help="Skip the torch.save/load baseline.")
    add_bench_arguments(
        parser,
        DEFAULTS,
        overrides_help="Config overrides: sync.backend (gloo | nccl | auto), sync.bucket_mb, sync.timeout_s.",
    )


def model_specs(target_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of float32 tensors in Qwen2-like shapes summing to about ``target_bytes``."""
    params = target_bytes // 4
    hidden = max(128, int(round(math.sqrt(params / 120) / 64)) * 64)  # ~10 layers' worth at 12 h^2 each
    inter = int(round(hidden * 8 / 3 / 64)) * 64
    vocab = 8192
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, (params - vocab * hidden - hidden) // per_layer)
    specs = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        specs += [(f"{p}.self_attn.{x}_proj.weight", (hidden, hidden)) for x in "qkvo"]
        specs += [
            (f"{p}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{p}.mlp.up_proj.weight", (inter, hidden)),
        ]
        specs += [(f"{p}.mlp.down_proj.weight", (hidden, inter))]
        specs += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
        ]
    specs.append(("model.norm.weight", (hidden,)))
    return specs


def _raw_group(port: int, rank: int, world: int, backend: str, timeout_s: float, is_master: bool):
    """A plain process group for the baselines (its own store and port)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(BENCH_HOST, port, None, is_master, timeout, wait_for_workers=False)
    prefixed = dist.PrefixStore("treepo-bench-raw", store)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return store, dist.ProcessGroupNCCL(prefixed, rank, world, opts)
    return store, dist.ProcessGroupGloo(prefixed, rank, world, timeout)


def _bcast(pg, t):
    from torch.distributed import BroadcastOptions

    opts = BroadcastOptions()
    opts.rootRank = 0
    pg.broadcast([t], opts).wait()


def _barrier(pg, device):
    import torch

    pg.allreduce([torch.zeros(1, device=device)]).wait()


def _receiver(info: dict, raw_port: int, rank: int, plan: list[dict], repeats: int, timeout_s: float) -> None:
    import torch

    from common.weight_sync import WeightReceiver

    torch.set_num_threads(1)
    recv = WeightReceiver.from_info(info, rank, timeout_s=timeout_s)
    _, raw = _raw_group(raw_port, rank, info["world_size"], info["backend"], timeout_s, False)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if info["backend"] == "nccl"
        else torch.device("cpu")
    )
    for item in plan:
        for _ in range(repeats + 1):  # + the unmeasured warm-up
            _, it = recv.receive()
            for _name, _t in it:
                pass
            recv.barrier()
        for _ in range(repeats):
            buf = torch.empty(item["bytes"], dtype=torch.uint8, device=device)
            _bcast(raw, buf)
            del buf
            _barrier(raw, device)
        if item["shm"]:
            for _ in range(repeats):
                _barrier(raw, device)  # the file is written
                torch.load(item["shm"], map_location=device, weights_only=True)
                _barrier(raw, device)
    recv.close()


def _plan(sizes_mb: list[float], device, no_shm: bool) -> tuple[list[dict], list[dict]]:
    """Per size: the receivers' plan (bytes, tensor count, the /dev/shm file or "") and the tensors."""
    import torch  # torch: only when the bench runs (`treepo --help` imports this module)

    shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") and not no_shm else None
    plan, models = [], []
    for mb in sizes_mb:
        specs = model_specs(int(mb * 1e6))
        named = {n: torch.empty(shape, device=device).uniform_(-1, 1) for n, shape in specs}
        nbytes = sum(t.numel() * t.element_size() for t in named.values())
        shm = (
            os.path.join(tempfile.mkdtemp(dir=shm_dir, prefix="treepo-bench-sync-"), "w.pt")
            if shm_dir
            else ""
        )
        plan.append({"mb": mb, "bytes": nbytes, "shm": shm, "params": len(named)})
        models.append(named)
    return plan, models


def _time_sizes(
    sender, raw, device, plan: list[dict], models: list[dict], repeats: int, n: int
) -> list[dict]:
    """Rank 0's side of every measurement, in the receivers' order: ours, raw, then shm."""
    import torch

    rows = []
    for item, named in zip(plan, models):
        ours, stats = [], None
        for rep in range(repeats + 1):  # the first is a warm-up (first-touch of fresh buffers)
            t0 = time.perf_counter()
            stats = sender.send(named.items(), rep)
            sender.barrier()
            if rep:
                ours.append(time.perf_counter() - t0)
        flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in named.values()])
        raws = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _bcast(raw, flat)
            _barrier(raw, device)
            raws.append(time.perf_counter() - t0)
        del flat
        shms = []
        if item["shm"]:
            for _ in range(repeats):
                t0 = time.perf_counter()
                torch.save(named, item["shm"])
                _barrier(raw, device)
                _barrier(raw, device)  # every receiver has loaded it
                shms.append(time.perf_counter() - t0)
            os.remove(item["shm"])
            os.rmdir(os.path.dirname(item["shm"]))
        rows.append(_row(item, stats.buckets, n, ours, raws, shms))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _row(item: dict, buckets: int, n: int, ours: list[float], raws: list[float], shms: list[float]) -> dict:
    b = item["bytes"]
    row = {
        "size_mb": round(b / 1e6, 1),
        "params": item["params"],
        "buckets": buckets,
        "receivers": n,
        "ours_s": round(min(ours), 4),
        "ours_gbps": round(b / min(ours) / 1e9, 3),
        "raw_s": round(min(raws), 4),
        "raw_gbps": round(b / min(raws) / 1e9, 3),
        "ours_vs_raw": round(min(raws) / min(ours), 3),
    }
    if shms:
        row.update(
            shm_s=round(min(shms), 4),
            shm_gbps=round(b / min(shms) / 1e9, 3),
            ours_vs_shm=round(min(shms) / min(ours), 3),
        )
    return row


def _measure(
    n_receivers: int, sizes_mb: list[float], args: argparse.Namespace, cfg: TrainConfig
) -> list[dict]:
    # torch and the weight sync (torch.distributed): only when the bench runs
    import torch
    import torch.multiprocessing as mp

    from common.weight_sync import WeightSender

    sc = cfg.sync
    sender = WeightSender(BENCH_HOST, 0, n_receivers + 1, sc.backend, sc.timeout_s, bucket_mb=sc.bucket_mb)
    backend = sender.backend  # "auto" resolved
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    with socket.socket() as s:
        s.bind((BENCH_HOST, 0))
        raw_port = s.getsockname()[1]
    plan, models = _plan(sizes_mb, device, args.no_shm)
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=_receiver,
            args=(sender.info.to_dict(), raw_port, r, plan, args.repeats, sc.timeout_s),
            daemon=True,
        )
        for r in range(1, n_receivers + 1)
    ]
    for p in procs:
        p.start()
    try:
        _, raw = _raw_group(raw_port, 0, n_receivers + 1, backend, sc.timeout_s, True)
        sender.connect()
        return _time_sizes(sender, raw, device, plan, models, args.repeats, n_receivers)
    finally:
        for p in procs:
            p.join(timeout=sc.timeout_s)
            if p.is_alive():
                p.kill()
        sender.close()


def run(args: argparse.Namespace) -> int:
    cfg = load_args_config(args, DEFAULTS)
    # torch and the weight sync: only when the bench runs (`treepo --help` imports this module)
    import torch

    from common.weight_sync import resolve_backend

    torch.set_num_threads(1)
    sizes = [float(x) for x in args.sizes_mb.split(",") if x]
    counts = [int(x) for x in args.receivers.split(",") if x]
    t0 = time.perf_counter()
    rows = []
    for n in counts:
        rows += _measure(n, sizes, args, cfg)
    report = {
        "bench": "sync",
        "preset": args.config,
        "overrides": requested_overrides(args, DEFAULTS),
        "backend": resolve_backend(cfg.sync.backend),
        "bucket_mb": cfg.sync.bucket_mb,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    emit_json(report, args.json)
    cols = [
        "size_mb",
        "receivers",
        "buckets",
        "ours_gbps",
        "raw_gbps",
        "ours_vs_raw",
        "shm_gbps",
        "ours_vs_shm",
    ]
    print_table([(c, 11) for c in cols], [[r.get(c, "-") for c in cols] for r in rows], left=0, sep=" | ")
    print(
        f"\n(GB/s = payload bytes / s; ratios = ours / baseline, > 1 is faster; {report['seconds']} s total)"
    )
    return 0
