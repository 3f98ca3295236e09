"""``worker_sync``: ``actors.backends.worker_sync.WorkerSync`` (the engine worker's receiver) on the
run's device: it joins a real ``WeightSender``'s group (store, token, rank claim), receives in its
background thread on a stream of its own while this thread sends, and stages every tensor in host
memory. The broadcasts pass through the in-process loopback wire (:mod:`gpucheck.loopback`: one GPU
cannot hold two ranks of an NCCL group; a root broadcast completes once the receiver copied it, as
on a wire), installed as the receiver's transport in this check's process only.

Checks: the staged tensors are on the host, in order and bit-exact; the GPU memory allocated is back
to where it was before the receive once the update is taken; reports the receive's device-to-host
GB/s beside one plain device-to-host copy, and the most GPU memory the receive held at once."""

from __future__ import annotations

import gc

from gpucheck.base import HOST, Context, gib, log, need_cuda, timed
from gpucheck.loopback import LoopbackTransport, LoopbackWire
from gpucheck.model import named_model_tensors, tensor_bytes

NAME = "worker_sync"
BUDGET_S = 35
NEEDS_MODEL = False
ABOUT = "WorkerSync on the device: host tensors exact, GPU memory back to baseline, device-to-host GB/s"
TIMEOUT_S = 60.0
SLACK_BYTES = 1 << 20  # allocated after the update is taken, over the baseline


def _tensors(ctx: Context):
    import torch

    shape = dict(ctx.sz.model, num_hidden_layers=ctx.sz.worker_sync_layers)
    return named_model_tensors(shape, ctx.device, torch.bfloat16 if ctx.gpu else torch.float32, seed=3)


def _open(ctx: Context, wire: LoopbackWire):
    import torch

    import common.weight_sync.receiver as receiver_module
    from actors.backends.worker_sync import WorkerSync
    from common.weight_sync import WeightSender

    backend = "nccl" if ctx.gpu else "gloo"
    receiver_module.transport_for = lambda name: LoopbackTransport(wire, name)  # this process only
    sender = WeightSender(HOST, 0, 2, backend=backend, timeout_s=TIMEOUT_S, bucket_mb=ctx.sz.bucket_mb)
    sender.channel, sender.device = wire.end(True, torch.device(ctx.device)), torch.device(ctx.device)
    worker = WorkerSync()
    worker.join(sender.info.to_dict(), 1, TIMEOUT_S)
    return sender, worker


def _compare(named: dict, weights: list, problems: list[str]) -> None:
    if [n for n, _ in weights] != list(named):
        problems.append(
            f"staged {len(weights)} tensors in another order or number than the {len(named)} sent"
        )
    for name, t in weights:
        want = named.get(name)
        if t.device.type != "cpu":
            problems.append(f"{name} is staged on {t.device}, not in host memory")
        elif want is None or t.dtype != want.dtype or tuple(t.shape) != tuple(want.shape):
            problems.append(f"{name} staged as {t.dtype} {tuple(t.shape)}")
        elif not bool((tensor_bytes(t) == tensor_bytes(want.cpu())).all()):
            problems.append(f"{name} differs from what was sent (not bit-exact)")


def _plain_d2h_gbps(ctx: Context, nbytes: int) -> float:
    import torch

    if not ctx.gpu:
        return float("nan")
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    seconds = min(timed(True, src.to, "cpu")[1] for _ in range(2))
    return nbytes / seconds / 1e9


def run(ctx: Context) -> dict:
    import torch

    need_cuda(ctx)
    named = _tensors(ctx)
    wire = LoopbackWire(clone=False)
    sender, worker = _open(ctx, wire)
    problems: list[str] = []
    try:
        if ctx.gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if ctx.gpu else 0
        worker.start()
        stats = sender.send(named.items(), version=5)
        version = worker.wait(TIMEOUT_S)
        state = worker.poll()
        held = (torch.cuda.max_memory_allocated() - base) if ctx.gpu else 0
        weights = worker.take(version)
        if version != 5:
            problems.append(f"received version {version}, sent 5")
        _compare(named, weights, problems)
        del weights
        gc.collect()
        after = torch.cuda.memory_allocated() if ctx.gpu else 0
        if ctx.gpu and after - base > SLACK_BYTES:
            problems.append(
                f"{gib(after - base)} GiB of GPU memory still allocated after the update was taken"
            )
        d2h = stats.bytes / state["seconds"] / 1e9 if state["seconds"] else float("nan")
        plain = _plain_d2h_gbps(ctx, min(stats.bytes, 1 << 30))
        log(
            f"worker_sync: {stats.bytes / 2**30:.2f} GiB in {state['seconds']:.2f} s, held {gib(held)} GiB on the GPU"
        )
        return {
            "device": ctx.device,
            "tensors": stats.params,
            "bytes": stats.bytes,
            "buckets": stats.buckets,
            "bucket_mb": ctx.sz.bucket_mb,
            "receive_s": round(state["seconds"], 3),
            "receive_d2h_gbps": round(d2h, 2),
            "plain_d2h_gbps": round(plain, 2),
            "gpu_held_during_receive_gib": gib(held),
            "gpu_left_after_take_bytes": after - base,
            "broadcasts": wire.sent,
            "summary": (
                f"{stats.params} tensors ({stats.bytes / 2**30:.2f} GiB) staged on the host bit-exact; receive "
                f"{d2h:.1f} GB/s (plain D2H {plain:.1f}); GPU held {gib(held)} GiB, {after - base} B left after take"
            ),
            "problems": problems,
        }
    finally:
        worker.close()
        sender.channel = None  # the loopback holds no group to abort
        sender.close()
