"""Helpers the checks share: the run context, logging, timing on the device, peak memory, free ports."""

from __future__ import annotations

import dataclasses
import resource
import socket
import time
from pathlib import Path

from gpucheck.sizes import Sizes

HOST = "127.0.0.1"


class Skip(Exception):
    """A check that cannot run here (not a failure)."""


@dataclasses.dataclass(frozen=True)
class Context:
    """What a check gets: the sizes of this run, whether it runs on CUDA, and the run's work directory
    (``model_dir`` is where ``setup`` writes the model the other checks load)."""

    sz: Sizes
    gpu: bool
    workdir: Path

    @property
    def model_dir(self) -> Path:
        return self.workdir / "model"

    @property
    def device(self) -> str:
        return "cuda" if self.gpu else "cpu"


def log(msg: str) -> None:
    print(f"[gpu-checks {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def need_cuda(ctx: Context) -> None:
    """Skip a GPU run's check where torch sees no CUDA device."""
    if ctx.gpu:
        import torch

        if not torch.cuda.is_available():
            raise Skip("CUDA is not available (torch.cuda.is_available() is False)")


def sync(gpu: bool) -> None:
    if gpu:
        import torch

        torch.cuda.synchronize()


def timed(gpu: bool, fn, *args, **kwargs):
    """``(result, seconds)`` of ``fn(*args, **kwargs)``, the device synchronised on both sides."""
    sync(gpu)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(gpu)
    return out, time.perf_counter() - t0


def peak_memory_gib(gpu: bool) -> dict[str, float]:
    if gpu:
        import torch

        return {
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
        }
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def gib(n: float) -> float:
    return round(n / 2**30, 3)


def local_tensor(t):
    """This rank's part of a parameter (FSDP2 parameters are DTensors; in a group of one, all of it),
    detached and cloned, without a collective."""
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def rel_error(got, want) -> float:
    """max |got - want| / max |want| in float32 (0 for two empty or all-zero tensors)."""
    got, want = got.float(), want.float()
    scale = float(want.abs().max()) if want.numel() else 0.0
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    return diff / scale if scale else diff
