"""``setup``: the model the learner and sampling checks load, written in Hugging Face format through the
project's own loading path's expectations (safetensors, config.json, tokenizer): a random-init Qwen2 of
the run's plan shape (GPU: a two-layer slice of Qwen2.5-7B) with the byte-level tokenizer. Also what
torch sees of the device."""

from __future__ import annotations

import json
import time

from gpucheck.base import Context, Skip
from gpucheck.envinfo import torch_cuda_report
from gpucheck.model import INFO, build_model_dir

NAME = "setup"
BUDGET_S = 40
NEEDS_MODEL = False
ABOUT = "random-init Qwen2 of the plan's shape (GPU: 2-layer Qwen2.5-7B slice) saved in HF format"


def run(ctx: Context) -> dict:
    env = torch_cuda_report() if ctx.gpu else {"cuda_available": False}
    if ctx.gpu and not env["cuda_available"]:
        raise Skip("CUDA is not available (torch.cuda.is_available() is False)")
    sz = ctx.sz
    t0 = time.perf_counter()
    build_model_dir(ctx.model_dir, sz.model, sz.model_dtype, ctx.device)
    info = json.loads((ctx.model_dir / INFO).read_text())
    size_gib = sum(f.stat().st_size for f in ctx.model_dir.iterdir()) / 2**30
    return {
        "torch": env,
        "model_dir": str(ctx.model_dir),
        "shape": sz.model,
        "params": info["params"],
        "saved_dtype": sz.model_dtype,
        "saved_gib": round(size_gib, 3),
        "build_s": round(time.perf_counter() - t0, 2),
        "summary": f"{info['params'] / 1e6:.1f} M params saved in {sz.model_dtype} ({size_gib:.2f} GiB)",
        "problems": [],
    }
