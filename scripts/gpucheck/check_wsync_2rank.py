"""``wsync_2rank``: sender and receiver as two processes on the one device, bit-exact. NCCL normally
refuses two ranks on one GPU: then the gloo path from CUDA tensors (what ``sync.backend=gloo`` does on a
GPU learner) runs instead, and the check is skipped with NCCL's reason if that passes (failed if not).
In the smoke run it is the gloo group on CPU."""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpucheck.base import HOST, Context, Skip, log
from gpucheck.model import named_model_tensors, odd_tensors, tensor_bytes

NAME = "wsync_2rank"
BUDGET_S = 45
NEEDS_MODEL = False
ABOUT = "sender and receiver as two processes (NCCL if it allows two ranks on one GPU, else gloo)"


def _digest(t) -> str:
    import hashlib

    return hashlib.sha256(tensor_bytes(t).cpu().numpy().tobytes()).hexdigest()


def _two_rank_tensors(sz, device: str):
    import torch

    shape = dict(sz.model, num_hidden_layers=sz.two_rank_layers)
    named = named_model_tensors(shape, device, torch.bfloat16 if device == "cuda" else torch.float32)
    named.update(odd_tensors(device))
    return named


def _process(out_path: str, device: str, body: Callable[[], dict[str, Any]]) -> None:
    """One side of the pair in its forked process: quiet NCCL, one thread, the GPU chosen; ``body``'s
    result (or the error it raised) written to ``out_path`` as JSON."""
    os.environ.setdefault("NCCL_DEBUG", "WARN")
    import torch

    torch.set_num_threads(1)
    try:
        if device == "cuda":
            torch.cuda.set_device(0)
        result = body()
    except Exception as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    Path(out_path).write_text(json.dumps(result))


def _sender_main(info_path: str, out_path: str, sz, backend: str, device: str, timeout_s: float) -> None:
    def body() -> dict[str, Any]:
        from common.weight_sync import WeightSender

        named = _two_rank_tensors(sz, device)
        sender = WeightSender(HOST, 0, 2, backend=backend, timeout_s=timeout_s, bucket_mb=sz.bucket_mb)
        Path(info_path + ".tmp").write_text(json.dumps(sender.info.to_dict()))
        os.replace(info_path + ".tmp", info_path)
        stats = sender.send(named.items(), version=3)
        sender.barrier()
        result = {
            "ok": True,
            "digests": [[n, _digest(t)] for n, t in named.items()],
            "gbps": stats.gbps,
            "bytes": stats.bytes,
            "buckets": stats.buckets,
            "seconds": stats.seconds,
        }
        sender.close()
        return result

    _process(out_path, device, body)


def _receiver_main(info_path: str, out_path: str, sender_out: str, device: str, timeout_s: float) -> None:
    def body() -> dict[str, Any]:
        from common.weight_sync import WeightReceiver

        deadline = time.monotonic() + timeout_s
        while not os.path.exists(info_path):
            if os.path.exists(sender_out):
                raise RuntimeError("the sender ended before publishing its group info")
            if time.monotonic() > deadline:
                raise TimeoutError("the sender never published its group info")
            time.sleep(0.05)
        receiver = WeightReceiver.from_info(json.loads(Path(info_path).read_text()), 1, timeout_s=timeout_s)
        version, stream = receiver.receive()
        digests = [[n, _digest(t)] for n, t in stream]
        receiver.barrier()
        st = receiver.last_stats
        result = {
            "ok": True,
            "version": version,
            "digests": digests,
            "device": str(receiver.device),
            "gbps": st.gbps if st else None,
        }
        receiver.close()
        return result

    _process(out_path, device, body)


def _two_rank_run(sz, backend: str, device: str, workdir: Path, timeout_s: float) -> dict:
    """Sender (tensors on ``device``) and receiver as two forked processes; both results, or an error."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    tag = f"{backend}-{device}"
    info, s_out, r_out = (str(workdir / f"2rank-{tag}-{x}.json") for x in ("info", "sender", "receiver"))
    for p in (info, s_out, r_out):
        Path(p).unlink(missing_ok=True)
    procs = [
        ctx.Process(target=_sender_main, args=(info, s_out, sz, backend, device, timeout_s)),
        ctx.Process(target=_receiver_main, args=(info, r_out, s_out, device, timeout_s)),
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s + 10  # the receiver waits for the sender at most timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    out = {}
    for role, path, p in (("sender", s_out, procs[0]), ("receiver", r_out, procs[1])):
        if os.path.exists(path):
            out[role] = json.loads(Path(path).read_text())
        else:
            out[role] = {"ok": False, "error": f"process ended (exit code {p.exitcode}) without a result"}
    return out


def _compare_two_rank(res: dict, label: str) -> list[str]:
    s, r = res["sender"], res["receiver"]
    if not (s["ok"] and r["ok"]):
        errs = [f"{role}: {res[role]['error']}" for role in ("sender", "receiver") if not res[role]["ok"]]
        return [f"{label}: " + "; ".join(errs)]
    problems = []
    if r["version"] != 3:
        problems.append(f"{label}: received version {r['version']}, sent 3")
    if r["digests"] != s["digests"]:
        bad = [a[0] for a, b in zip(s["digests"], r["digests"]) if a != b]
        problems.append(f"{label}: {len(bad)} tensors differ (or order/count differs): {bad[:3]}")
    return problems


def _nccl_refused(res: dict) -> str:
    """NCCL's refusal of two ranks on one GPU, if that is what failed ('' otherwise)."""
    text = " ".join(res[r].get("error", "") + res[r].get("trace", "") for r in ("sender", "receiver"))
    low = text.lower()
    for needle in ("duplicate gpu", "invalid usage", "ncclinvalidusage"):
        if needle in low:
            return needle
    return ""


def run(ctx: Context) -> dict:
    """The real two-rank group: NCCL on one GPU if NCCL allows it (else skipped, gloo from CUDA tensors
    instead), gloo in the smoke run."""
    sz, workdir = ctx.sz, ctx.workdir
    if not ctx.gpu:
        res = _two_rank_run(sz, "gloo", "cpu", workdir, timeout_s=30)
        problems = _compare_two_rank(res, "gloo")
        s = res["sender"]
        details = {"backend": "gloo", "device": "cpu", "problems": problems}
        if s["ok"]:
            details.update(bytes=s["bytes"], buckets=s["buckets"], sender_gbps=round(s["gbps"], 3))
            details["summary"] = f"gloo bit-exact, {s['gbps']:.2f} GB/s ({s['bytes'] / 2**20:.1f} MiB)"
        return details
    import torch

    # this process forks the two ranks, which must be able to initialise CUDA: with
    # PYTORCH_NVML_BASED_CUDA_CHECK=1 (set by main) this asks NVML, not the CUDA runtime
    if not torch.cuda.is_available():
        raise Skip("CUDA is not available")
    res = _two_rank_run(sz, "nccl", "cuda", workdir, timeout_s=10)
    problems = _compare_two_rank(res, "nccl")
    s = res["sender"]
    if not problems:
        return {
            "backend": "nccl",
            "bytes": s["bytes"],
            "buckets": s["buckets"],
            "sender_gbps": round(s["gbps"], 2),
            "summary": f"NCCL on one GPU bit-exact, {s['gbps']:.1f} GB/s ({s['bytes'] / 2**30:.2f} GiB)",
            "problems": [],
        }
    refused = _nccl_refused(res)
    if not refused:
        return {"backend": "nccl", "problems": problems}
    log(f"wsync_2rank: NCCL refused two ranks on one GPU ({refused}); trying gloo from CUDA tensors")
    fb = _two_rank_run(sz, "gloo", "cuda", workdir, timeout_s=20)
    fb_problems = _compare_two_rank(fb, "gloo from CUDA tensors")
    nccl_note = f"NCCL refused two ranks on one GPU ('{refused}': {problems[0][:300]})"
    if fb_problems:  # the gloo path from GPU tensors (sync.backend=gloo on a GPU learner) is broken
        return {"backend": "gloo (NCCL refused)", "nccl": nccl_note, "problems": fb_problems}
    fb_s = fb["sender"]
    raise Skip(
        f"{nccl_note}; instead gloo from CUDA tensors: bit-exact, {fb_s['gbps']:.2f} GB/s "
        f"({fb_s['bytes'] / 2**30:.2f} GiB)"
    )
