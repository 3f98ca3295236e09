"""``treepo bench queue``: trees/s and push→read latency through the replay queue, next to redis-benchmark.

For each tree size (default: a realistic TreePO tree — w=16 leaves, 14 segments of 512 tokens per
leaf with binary branching over the first 4 levels (190 segments), int32 tokens + float32 logprobs ≈ 0.8 MB — and
a small tree), on one Redis server (the embedded one in a temporary directory, AOF
``queue.appendfsync``, unless ``queue.url`` is given; the ``queue`` section comes from ``--config
PRESET`` and ``key=value`` overrides, validated like ``treepo train``'s, by default the config's with
``queue.maxmemory_mb=4096``):

1. throughput: a producer *process* pushes N trees as fast as it can while the consumer (this
   process) reads them with ``XREADGROUP`` (count 16), decodes/validates and acknowledges them;
   trees/s and MB/s = N / (first push → last read);
2. latency: the producer pushes at about half that rate; latency = consumer's decode finished −
   producer's clock before ``encode_tree`` (same machine, same clock), p50/p99 — so it includes
   encode, XADD, XREADGROUP and decode/validation;
3. transport only: the same pipeline with pre-encoded bytes and no decoding (XADD → XREADGROUP →
   XACK), to separate Redis and the client from the codec;
4. baseline: ``redis-benchmark -t set -d <entry bytes>`` on the same server with 1 client (our
   pipeline has one producer) and with 8 clients; the ratio is our MB/s over its MB/s. Only on the
   embedded server (no ``queue.url``): redis-benchmark takes passwords on its command line only, so it
   runs as a one-use ACL user (see :func:`_redis_benchmark`), which needs the server's admin.

It also times ``encode_tree``/``decode_tree`` alone (in-process), which is where most of the gap is.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue as queue_mod
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from typing import Any

import numpy as np

from cluster.bench.report import add_bench_arguments, emit_json, print_table
from cluster.config_args import load_args_config, requested_overrides
from common.tree import Leaf, Segment, Tree, decode_tree, encode_tree

SIZES = {
    # name: (w, depth, segment tokens)
    "large": (16, 14, 512),
    "small": (4, 4, 64),
}


def synthetic_tree(
    tree_id: str, w: int, depth: int, seg_tokens: int, seed: int = 0, prompt_tokens: int = 128
) -> Tree:
    """A valid tree: binary branching until ``w`` leaves (largest power of 2 ≤ w), then chains, so
    every leaf has ``depth`` segments of ``seg_tokens`` tokens."""
    rng = np.random.default_rng(seed)
    segments: list[Segment] = []
    frontier = [0]
    next_id = 1
    for d in range(1, depth + 1):
        kids = 2 if len(frontier) * 2 <= w else 1  # binary branching until w leaves, then chains
        new_frontier = []
        for parent in frontier:
            for _ in range(kids):
                segments.append(
                    Segment(
                        next_id,
                        parent,
                        d,
                        rng.integers(0, 150_000, seg_tokens, dtype=np.int32),
                        -rng.random(seg_tokens, dtype=np.float32) * 5,
                        version=d // 4,
                    )
                )
                new_frontier.append(next_id)
                next_id += 1
        frontier = new_frontier
    leaves = [
        Leaf(node, "eos", depth * seg_tokens, float(i % 2), None, bool(i % 2))
        for i, node in enumerate(frontier)
    ]
    return Tree(
        tree_id,
        f"p-{tree_id}",
        rng.integers(0, 150_000, prompt_tokens, dtype=np.int32),
        segments,
        leaves,
        generator_id=0,
        metadata={"epoch": 0},
    )


# the bench's own setting (used without --config): room for the large trees' runs in the embedded Redis
DEFAULTS = ["queue.maxmemory_mb=4096"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes", default="large,small", help=f"Comma-separated tree sizes from {sorted(SIZES)}."
    )
    parser.add_argument(
        "--trees", type=int, default=100, help="Trees per throughput run (large; small uses 10x)."
    )
    parser.add_argument("--latency-trees", type=int, default=60, help="Trees per paced latency run.")
    parser.add_argument(
        "--bench-requests", type=int, default=200, help="redis-benchmark requests (large; small 10x)."
    )
    add_bench_arguments(
        parser,
        DEFAULTS,
        overrides_help="Config overrides: queue.url (default: an embedded redis-server in a temp dir) and "
        "queue.password_env (the variable holding its password), queue.max_entry_mb; for the embedded "
        "server queue.appendfsync and queue.maxmemory_mb.",
    )


def _producer(
    url: str, password: str, run: str, size: str, n: int, interval_s: float, raw: bool, max_entry: int, q
) -> None:
    from common.replay import ReplayQueue  # redis: only when the bench runs

    w, depth, seg = SIZES[size]
    queue = ReplayQueue(url, run, password=password, max_entry_bytes=max_entry)
    trees = [synthetic_tree(f"{size}-{i}", w, depth, seg, seed=i % 4) for i in range(min(n, 4))]
    blobs = [encode_tree(t) for t in trees]
    q.put("ready")
    t0 = time.perf_counter()
    for i in range(n):
        tree = trees[i % len(trees)]
        tree.tree_id = f"{size}-{i}"
        if interval_s:
            wait = t0 + i * interval_s - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        if raw:  # transport only: pre-encoded bytes, no codec
            queue.redis.xadd(queue.keys["trees"], {"tree": blobs[i % len(blobs)], "t": repr(time.time())})
            continue
        tree.timings["pushed_at"] = time.time()
        queue.push(tree)
    queue.close()
    q.put("done")


def _read_raw(queue, count: int) -> list[tuple[str, float]]:
    """Transport-only consumer: XREADGROUP + the producer's timestamp, no decoding."""
    resp = queue.redis.xreadgroup("learners", "bench", {queue.keys["trees"]: ">"}, count=count, block=1000)
    return [(rid.decode(), float(f[b"t"])) for _key, rows in resp or [] for rid, f in rows]


def _run_pipeline(
    url: str,
    password: str,
    run: str,
    size: str,
    n: int,
    interval_s: float,
    *,
    max_entry: int,
    raw: bool = False,
) -> dict[str, Any]:
    from common.replay import ReplayQueue  # redis: only when the bench runs

    queue = ReplayQueue(url, run, password=password, max_entry_bytes=max_entry, block_ms=1000)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    args = (url, password, run, size, n, interval_s, raw, max_entry, q)
    proc = ctx.Process(target=_producer, args=args, daemon=True)
    proc.start()
    deadline = time.monotonic() + 120
    while True:
        try:
            q.get(timeout=1)
            break
        except queue_mod.Empty:
            if not proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"queue benchmark producer failed to start (exit code {proc.exitcode})"
                ) from None
    latencies, got = [], 0
    t_first = time.time()
    deadline = time.monotonic() + 300
    while got < n and time.monotonic() < deadline:
        if raw:
            entries = _read_raw(queue, 16)
            stamps = [t for _, t in entries]
        else:
            entries = queue.read(16, block_ms=1000, consumer="bench")
            stamps = [tree.timings["pushed_at"] for _, tree in entries]
        now = time.time()
        for t in stamps:
            latencies.append(now - t)
            t_first = min(t_first, t)
        if entries:
            queue.ack([i for i, _ in entries])
            got += len(entries)
    t_last = time.time()
    proc.join(60)
    queue.trim_acked()
    queue.close()
    if got < n:
        raise RuntimeError(f"only {got}/{n} trees arrived")
    lat = np.array(latencies) * 1000
    return {
        "trees": got,
        "seconds": t_last - t_first,
        "trees_per_s": got / (t_last - t_first),
        "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p99": float(np.percentile(lat, 99)),
    }


def _redis_benchmark(server: Any, size_bytes: int, n: int, clients: int) -> float | None:
    """SET requests/s of redis-benchmark against the embedded ``server`` this command started (None
    if it is not installed or failed).

    redis-benchmark (7.0) takes a password only on its command line (``-a``; it reads no
    REDISCLI_AUTH), where ``ps`` shows it. So it never gets the queue's or the admin's password: it
    logs in as a one-use ACL user created here with a random password, allowed only SET (and PING) on
    redis-benchmark's own ``key:*`` keys, deleted (its connections closed) as soon as it exits."""
    exe = shutil.which("redis-benchmark")
    if exe is None or server is None:
        return None
    admin = server.client()
    user, password = f"bench-{secrets.token_hex(4)}", secrets.token_hex(16)
    admin.acl_setuser(
        user, enabled=True, reset=True, passwords=[f"+{password}"], keys=["key:*"], commands=["+set", "+ping"]
    )
    try:
        out = subprocess.run(
            [
                exe,
                "-h",
                "127.0.0.1",
                "-p",
                str(server.port),
                "--user",
                user,
                "-a",
                password,
                "-t",
                "set",
                "-d",
                str(size_bytes),
                "-n",
                str(n),
                "-c",
                str(clients),
                "-q",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        admin.acl_deluser(user)
        admin.close()
    m = re.search(r"SET:\s*([\d.]+)\s*requests per second", out.stdout)
    return float(m.group(1)) if m else None


def _codec(size: str, reps: int) -> dict[str, float]:
    w, depth, seg = SIZES[size]
    tree = synthetic_tree("codec", w, depth, seg)
    t0 = time.perf_counter()
    for _ in range(reps):
        data = encode_tree(tree)
    t1 = time.perf_counter()
    for _ in range(reps):
        decode_tree(data)
    t2 = time.perf_counter()
    return {
        "entry_bytes": len(data),
        "encode_ms": (t1 - t0) / reps * 1000,
        "decode_ms": (t2 - t1) / reps * 1000,
    }


def _measure_size(
    url: str, password: str, server: Any, size: str, args: argparse.Namespace, max_entry: int
) -> dict:
    """Codec, throughput, paced latency, transport only and redis-benchmark SET for one tree size."""
    scale = 1 if size == "large" else 10
    codec = _codec(size, 5 if size == "large" else 100)
    run_name = f"bench-{size}-{os.getpid()}-{int(time.time())}"
    thr = _run_pipeline(url, password, run_name, size, args.trees * scale, 0.0, max_entry=max_entry)
    interval = 2.0 / thr["trees_per_s"]
    lat = _run_pipeline(
        url, password, run_name + "-lat", size, args.latency_trees, interval, max_entry=max_entry
    )
    transport = _run_pipeline(
        url, password, run_name + "-raw", size, args.trees * scale, 0.0, raw=True, max_entry=max_entry
    )
    entry = codec["entry_bytes"]
    ours_mb_s = thr["trees_per_s"] * entry / 1e6
    base = {}
    for clients in (1, 8):
        rps = _redis_benchmark(server, entry, args.bench_requests * scale, clients)
        base[f"c{clients}"] = None if rps is None else {"set_per_s": rps, "mb_per_s": rps * entry / 1e6}
    _drop_runs(url, password, [run_name, run_name + "-lat", run_name + "-raw"])
    return {
        "shape": dict(zip(("w", "depth", "segment_tokens"), SIZES[size])),
        **codec,
        "throughput": thr,
        "paced_latency": lat,
        "ours_mb_per_s": ours_mb_s,
        "transport_only": {**transport, "mb_per_s": transport["trees_per_s"] * entry / 1e6},
        "redis_benchmark_set": base,
        "ratio_vs_set_c1": ours_mb_s / base["c1"]["mb_per_s"] if base.get("c1") else None,
        "ratio_vs_set_c8": ours_mb_s / base["c8"]["mb_per_s"] if base.get("c8") else None,
    }


def _drop_runs(url: str, password: str, names: list[str]) -> None:
    from common.replay import ReplayQueue  # redis: only when the bench runs

    for name in names:
        q = ReplayQueue(url, name, password=password)
        q.redis.delete(*q.keys.values())
        q.close()


def run(args: argparse.Namespace) -> int:
    # redis: only when the bench runs (`treepo --help` imports this module)
    from cluster.pipeline.redis_launcher import EmbeddedRedis

    cfg = load_args_config(args, DEFAULTS)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            raise SystemExit(f"unknown size {s!r}; choose from {sorted(SIZES)}")
    q = cfg.queue
    tmp = None
    server = None
    if q.url:
        url, password = q.url, os.environ.get(q.password_env, "")
    else:
        tmp = tempfile.mkdtemp(prefix="treepo-bench-queue-")
        server = EmbeddedRedis(tmp, appendfsync=q.appendfsync, maxmemory_mb=q.maxmemory_mb).start()
        url, password = server.url, server.password
    report: dict[str, Any] = {
        "preset": args.config,
        "overrides": requested_overrides(args, DEFAULTS),
        "url": url.split("@")[-1],
        "appendfsync": q.appendfsync if server else "server's",
        "sizes": {},
    }
    try:
        for size in sizes:
            max_entry = int(q.max_entry_mb * 2**20)
            report["sizes"][size] = _measure_size(url, password, server, size, args, max_entry)
    finally:
        if server is not None:
            server.stop()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    emit_json(report, args.json, indent=1)
    _print_table(report)
    return 0


def _print_table(report: dict[str, Any]) -> None:
    cols = [
        ("size", 6), ("entry KB", 9), ("enc ms", 7), ("dec ms", 7), ("trees/s", 8), ("MB/s", 7),
        ("p50 ms", 7), ("p99 ms", 7), ("raw MB/s", 9), ("SET c1 MB/s", 12), ("ratio", 6),
        ("SET c8 MB/s", 12), ("ratio", 6),
    ]  # fmt: skip
    rows = []
    for size, r in report["sizes"].items():
        b1, b8 = r["redis_benchmark_set"].get("c1"), r["redis_benchmark_set"].get("c8")
        rows.append(
            [
                size,
                f"{r['entry_bytes'] / 1e3:.1f}",
                f"{r['encode_ms']:.2f}",
                f"{r['decode_ms']:.2f}",
                f"{r['throughput']['trees_per_s']:.1f}",
                f"{r['ours_mb_per_s']:.1f}",
                f"{r['paced_latency']['latency_ms_p50']:.2f}",
                f"{r['paced_latency']['latency_ms_p99']:.2f}",
                f"{r['transport_only']['mb_per_s']:.1f}",
                f"{b1['mb_per_s']:.1f}" if b1 else "n/a",
                f"{r['ratio_vs_set_c1']:.3f}" if b1 else "n/a",
                f"{b8['mb_per_s']:.1f}" if b8 else "n/a",
                f"{r['ratio_vs_set_c8']:.3f}" if b8 else "n/a",
            ]
        )
    print_table(cols, rows, left=0, sep=" ")
    print(
        "\nMB/s: end to end (encode, XADD, XREADGROUP, decode+validate, XACK); raw: the same bytes "
        "without the codec; ratio: ours / redis-benchmark SET of the same size (1 and 8 clients)."
    )
