"""``wsync_pack``: ``WeightSender.send`` -> ``WeightReceiver.receive`` of the model's tensors (plus odd
dtypes and shapes) on the run's device through the in-process loopback wire (:mod:`gpucheck.loopback`;
one GPU cannot hold both ranks of an NCCL group): every tensor bit-exact, with and without a streaming
spec; packing GB/s beside one plain device copy of the same bytes."""

from __future__ import annotations

import math
from collections import Counter

from gpucheck.base import HOST, Context, log, need_cuda, timed
from gpucheck.loopback import LoopbackWire
from gpucheck.model import named_model_tensors, odd_tensors, tensor_bytes

NAME = "wsync_pack"
BUDGET_S = 30
NEEDS_MODEL = False
ABOUT = "weight-sync pack/unpack round trip on the device, bit-exact; packing GB/s vs a plain copy"


def _open(ctx: Context, bucket_mb: float):
    import torch

    from common.weight_sync import WeightReceiver, WeightSender

    backend = "nccl" if ctx.gpu else "gloo"
    sender = WeightSender(HOST, 0, world_size=2, backend=backend, bucket_mb=bucket_mb, timeout_s=30)
    receiver = WeightReceiver(HOST, sender.port, rank=1, world_size=2, backend=backend, timeout_s=30)
    wire = LoopbackWire(clone=True)
    device = torch.device(ctx.device)
    sender.channel, receiver.channel = wire.end(True, device), wire.end(False, device)
    sender.device = receiver.device = device
    return sender, receiver, wire


def _throughput(ctx: Context, sender, wire, named) -> tuple[float, float, object]:
    """Best send time with the wire discarding (packing only) and one plain device copy; (send s, copy s, stats)."""
    import torch

    wire.keep = False
    best, stats = math.inf, None
    for rep in range(ctx.sz.pack_repeats):
        stats, dt = timed(ctx.gpu, sender.send, named.items(), version=rep)
        best = min(best, dt)
    src = torch.empty(stats.bytes, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    raw = min(timed(ctx.gpu, dst.copy_, src)[1] for _ in range(max(2, ctx.sz.pack_repeats)))
    wire.keep = True
    return best, raw, stats


def _round_trip(label, version, kwargs, sender, receiver, wire, named, device) -> list[str]:
    problems = []
    sent = sender.send(iter(list(named.items())), version=version, **kwargs)
    got_version, stream = receiver.receive()
    seen = []
    for name, t in stream:
        seen.append(name)
        want = named[name]
        if t.dtype != want.dtype or tuple(t.shape) != tuple(want.shape):
            problems.append(f"{label}: {name} came back {t.dtype} {tuple(t.shape)}")
        elif t.device.type != device.type:
            problems.append(f"{label}: {name} came back on {t.device}")
        elif not bool((tensor_bytes(t) == tensor_bytes(want)).all()):
            problems.append(f"{label}: {name} differs (not bit-exact)")
    if seen != list(named):
        problems.append(f"{label}: received {len(seen)} tensors in another order than the {len(named)} sent")
    if got_version != version:
        problems.append(f"{label}: version {got_version}, sent {version}")
    if not wire.queue.empty():
        problems.append(f"{label}: broadcasts left unconsumed")
    log(f"wsync_pack: round trip ({label}) of {sent.params} tensors: {len(problems)} problems")
    return problems


def run(ctx: Context) -> dict:
    import torch

    from common.weight_sync import plan_buckets

    need_cuda(ctx)
    sz = ctx.sz
    dtype = torch.bfloat16 if ctx.gpu else torch.float32
    named = named_model_tensors(sz.model, ctx.device, dtype)
    named.update(odd_tensors(ctx.device))
    sender, receiver, wire = _open(ctx, sz.bucket_mb)
    try:
        best, raw, stats = _throughput(ctx, sender, wire, named)
        total = stats.bytes
        pack_gbps, raw_gbps = total / best / 1e9, total / raw / 1e9
        log(
            f"wsync_pack: {stats.params} tensors, {total / 2**30:.3f} GiB in {stats.buckets} buckets: {pack_gbps:.1f} GB/s"
        )
        spec = [(n, t.dtype, tuple(t.shape)) for n, t in named.items()]
        problems = _round_trip("listed", 7, {}, sender, receiver, wire, named, sender.device)
        problems += _round_trip("streamed", 8, {"spec": spec}, sender, receiver, wire, named, sender.device)
        meta = plan_buckets(spec, sender.bucket_bytes, 0)
        per_bucket = Counter(p.bucket for p in meta.params)
        # a bucket of one contiguous tensor goes out as the tensor itself, with no packing copy
        zero_copy = sum(meta.bucket_nbytes[b] for b, n in per_bucket.items() if n == 1)
        return {
            "device": ctx.device,
            "dtype": str(dtype),
            "tensors": stats.params,
            "zero_copy_bytes": zero_copy,
            "bytes": total,
            "buckets": stats.buckets,
            "bucket_mb": sz.bucket_mb,
            "send_gbps": round(pack_gbps, 2),
            "plain_copy_gbps": round(raw_gbps, 2),
            "send_over_plain_copy": round(pack_gbps / raw_gbps, 3),
            "summary": (
                f"bit-exact x2; send {pack_gbps:.1f} GB/s vs plain copy {raw_gbps:.1f} GB/s "
                f"({total / 2**30:.2f} GiB, {stats.buckets} buckets of {sz.bucket_mb:g} MiB)"
            ),
            "problems": problems,
        }
    finally:
        sender.channel = receiver.channel = None  # nothing to abort: no real group was built
        sender.close()
        receiver.close()
