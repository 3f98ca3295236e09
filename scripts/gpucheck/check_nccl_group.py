"""``nccl_group``: the weight sync's own transport (``common.weight_sync.torch_dist``) as a group of one
(NCCL on GPU, gloo in the smoke run), driven from a side thread the way ``WorkerSync`` receives: the
thread makes the device current, works on a stream of its own, connects on the weight sync's store,
broadcasts ``nccl_mib`` (GPU: 1 GiB, then 64 MiB; each twice, the first one cold) with a timed wait,
then drops the group (abort). An operation posted on the dropped group must end (raise or complete)
within the timeout instead of hanging, and the process must survive the abort (NCCL's watchdog kills
it otherwise: the runner then records the check's process as died without a result)."""

from __future__ import annotations

import contextlib
import datetime
import threading
import time

from gpucheck.base import HOST, Context, log, need_cuda

NAME = "nccl_group"
BUDGET_S = 30
NEEDS_MODEL = False
ABOUT = "NCCL group of one from a side thread: connect, broadcast 1 GiB + 64 MiB with timed waits, abort"
TIMEOUT_S = 20.0


def _connect(backend: str, timeout: datetime.timedelta):
    from common.weight_sync.store import open_master_store
    from common.weight_sync.torch_dist import TorchDistTransport

    store = open_master_store(HOST, 0, timeout)
    return store, TorchDistTransport(backend).connect(store, 0, 1, timeout)


def _broadcasts(channel, sizes: list[int], device, timeout) -> list[dict]:
    """Each size twice (cold, warm): post, then a timed wait."""
    import torch

    out = []
    for size in sizes:
        t = torch.full((size,), 7, dtype=torch.uint8, device=device)
        for attempt in ("cold", "warm"):
            t0 = time.perf_counter()
            work = channel.broadcast(t)
            posted = time.perf_counter() - t0
            work.wait(timeout)
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
            seconds = time.perf_counter() - t0
            out.append(
                {
                    "mib": size >> 20,
                    "attempt": attempt,
                    "post_s": round(posted, 4),
                    "wait_s": round(seconds, 4),
                }
            )
        if int(t[0]) != 7 or int(t[-1]) != 7:
            raise RuntimeError(f"the broadcast of {size >> 20} MiB changed its buffer in a group of one")
        del t
    return out


def _after_abort(pg, device, timeout_s: float) -> str:
    """A broadcast posted on the aborted group: 'raised: ...', 'completed' or 'hung' (past the timeout)."""
    import torch
    from torch.distributed import BroadcastOptions

    outcome = ["hung"]

    def post():
        try:
            opts = BroadcastOptions()
            opts.rootRank, opts.timeout = 0, datetime.timedelta(seconds=timeout_s)
            pg.broadcast([torch.zeros(16, device=device)], opts).wait(datetime.timedelta(seconds=timeout_s))
            outcome[0] = "completed"
        except Exception as e:  # what an aborted group should do
            outcome[0] = (
                f"raised: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            )

    th = threading.Thread(target=post, daemon=True, name="treepo-gpu-check-after-abort")
    th.start()
    th.join(timeout_s + 5)
    return outcome[0]


def _side(backend: str, device_index, sizes: list[int], result: dict) -> None:
    """The side thread: everything the weight-sync receive thread does with a group, timed."""
    import torch

    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    stream_ctx = contextlib.nullcontext()
    try:
        device = torch.device("cpu")
        if device_index is not None:
            torch.cuda.set_device(device_index)
            device = torch.device("cuda", device_index)
            stream_ctx = torch.cuda.stream(torch.cuda.Stream(device))
        with stream_ctx:
            t0 = time.perf_counter()
            store, channel = _connect(backend, timeout)
            result["connect_s"] = round(time.perf_counter() - t0, 3)
            result["broadcasts"] = _broadcasts(channel, sizes, device, timeout)
            pg = channel.pg
            t0 = time.perf_counter()
            channel.drop()  # aborts the group, releases it in the background
            result["abort_s"] = round(time.perf_counter() - t0, 3)
            result["after_abort"] = _after_abort(pg, device, TIMEOUT_S)
            del store
        result["ok"] = True
    except BaseException as e:  # the side thread reports every failure, as WorkerSync's does
        result["ok"] = False
        result["error"] = f"{type(e).__name__}: {e}"[:1000]


def run(ctx: Context) -> dict:
    need_cuda(ctx)
    import torch

    backend = "nccl" if ctx.gpu else "gloo"
    if ctx.gpu:
        torch.cuda.set_device(0)  # the caller's device, which the side thread takes over
    device_index = torch.cuda.current_device() if ctx.gpu else None
    sizes = [int(mib) << 20 for mib in ctx.sz.nccl_mib]
    result: dict = {}
    th = threading.Thread(
        target=_side, args=(backend, device_index, sizes, result), daemon=True, name="treepo-gpu-check-nccl"
    )
    t0 = time.perf_counter()
    th.start()
    th.join(4 * TIMEOUT_S)
    problems = []
    if th.is_alive():
        problems.append(f"the side thread still runs after {4 * TIMEOUT_S:g} s (a wait ignored its timeout)")
    elif not result.get("ok"):
        problems.append(f"the side thread failed: {result.get('error')}")
    if result.get("after_abort") == "hung":
        problems.append(
            f"a broadcast on the aborted group neither raised nor completed within {TIMEOUT_S:g} s"
        )
    warm = [b for b in result.get("broadcasts", []) if b["attempt"] == "warm"]
    log(f"nccl_group: {result}")
    line = ", ".join(f"{b['mib']} MiB {b['wait_s'] * 1e3:.1f} ms" for b in warm)
    return {
        "backend": backend,
        "sizes_mib": list(ctx.sz.nccl_mib),
        **{k: v for k, v in result.items() if k != "ok"},
        "seconds": round(time.perf_counter() - t0, 3),
        "summary": f"{backend} group of one from a side thread: connect {result.get('connect_s', '?')} s; {line or 'no broadcast'}; "
        f"abort {result.get('abort_s', '?')} s, then a broadcast {str(result.get('after_abort', '?')).split(':')[0]}",
        "problems": problems,
    }
