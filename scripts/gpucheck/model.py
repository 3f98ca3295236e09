"""The checks' model and tensors: a random-init Qwen2 of a plan shape in Hugging Face format, and
named tensors shaped like a model's ``weights_for_sync`` for the weight-sync checks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

INFO = "gpu_checks_model.json"


def qwen2_config(shape: dict, tokenizer=None):
    """A Qwen2 config of ``shape`` (config.json fields). Its weights' init scale is 2.5 / sqrt(hidden)
    rather than transformers' 0.02: attention scores and logits then spread over several units, so a
    token attending to the wrong keys changes its log-probs far beyond bf16's rounding."""
    from transformers import Qwen2Config

    ids = {}
    if tokenizer is not None:
        ids = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    fields = dict(
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        initializer_range=2.5 / math.sqrt(shape["hidden_size"]),
    )
    fields.update(shape)
    return Qwen2Config(**ids, **fields)


def build_model_dir(out: str | os.PathLike, shape: dict, dtype: str, device: str) -> Path:
    """A random-init Qwen2 of ``shape`` saved in ``dtype`` with a byte-level tokenizer (HF format).

    The tokenizer is the project's byte-level one (260 ids); the model's vocabulary is larger, as in
    real checkpoints whose embedding rows outnumber the tokenizer's ids (ids past it decode to '').
    """
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    from common.tiny import build_tokenizer

    hf_logging.disable_progress_bar()
    out = Path(out)
    tokenizer = build_tokenizer(None)
    config = qwen2_config(shape, tokenizer)
    torch.manual_seed(0)
    with torch.device(device):  # initialising a billion parameters on the GPU takes a moment
        model = Qwen2ForCausalLM(config)
    model = model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    tmp = out.with_name(out.name + ".partial")  # renamed when complete: a killed build leaves no model
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    params = sum(p.numel() for p in model.parameters())
    (tmp / INFO).write_text(json.dumps({"shape": shape, "dtype": dtype, "params": params}))
    os.rename(tmp, out)
    return out


def named_model_tensors(shape: dict, device: str, dtype, seed: int = 0) -> dict:
    """Random tensors named and shaped like a Qwen2 model's ``weights_for_sync`` (a tied lm_head is the
    embedding tensor itself, as it is there); the model is built on the meta device (no memory)."""
    import torch
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        meta = Qwen2ForCausalLM(qwen2_config(shape))
    g = torch.Generator(device=device).manual_seed(seed)
    out: dict = {}
    by_param: dict[int, Any] = {}
    for name, p in meta.named_parameters(remove_duplicate=False):
        if id(p) not in by_param:
            t = torch.randn(tuple(p.shape), generator=g, device=device, dtype=torch.float32)
            by_param[id(p)] = t.to(dtype)
        out[name] = by_param[id(p)]
    return out


def odd_tensors(device: str, seed: int = 1) -> dict:
    """Dtypes and shapes that stress packing: fp16, int64, bool, a scalar, an empty and a transposed one."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    return {
        "odd.half": torch.randn(3, 5, 7, generator=g, device=device).half(),
        "odd.ids": torch.randint(-(2**40), 2**40, (19,), generator=g, device=device),
        "odd.mask": torch.rand(23, generator=g, device=device) > 0.5,
        "odd.scalar": torch.tensor(1.25, device=device),
        "odd.empty": torch.zeros(0, 5, device=device),
        "odd.transposed": torch.randn(13, 7, generator=g, device=device).t(),
        # larger than the smoke run's 64 KiB bucket and not contiguous: travels alone, copied
        "odd.big_transposed": torch.randn(300, 100, generator=g, device=device).t(),
        "odd.fp32": torch.randn(33, generator=g, device=device),
    }


def tensor_bytes(t):
    """A tensor's bytes as a flat uint8 view (bit-exact comparisons)."""
    import torch

    return t.detach().contiguous().reshape(-1).view(torch.uint8)
