"""The sizes of a run: the GPU run, the CPU stand-in (``--smoke``) and tests/gpu. Model shapes come from
``common/plan.py`` (the presets' architectures and the tiny sizes), never typed in here.

GPU: the learner, sampling and weight-sync checks use a slice of Qwen2.5-7B (its hidden size, MLP,
28 query / 4 KV heads of dimension 128 and untied 152064-token vocabulary, two decoder layers:
1.56 B parameters), randomly initialised; the attention check uses 7B's head shapes at 8192 tokens.
Smoke: the plan's ``xs`` tiny shape (vocabulary widened to hold the byte tokenizer's ids).
"""

from __future__ import annotations

import dataclasses

from common.plan import KNOWN_ARCHS, TINY_ARCHS

SEVEN_B = "Qwen/Qwen2.5-7B"
BYTE_VOCAB = 512  # the tiny models' vocabulary here: more rows than the byte tokenizer's 260 ids


def seven_b_slice(layers: int) -> dict:
    """Qwen2.5-7B's config fields (common/plan.py) with ``layers`` decoder layers."""
    return dict(KNOWN_ARCHS[SEVEN_B], num_hidden_layers=layers)


def tiny(size: str, vocab: int = BYTE_VOCAB) -> dict:
    """A tiny size of common/plan.py (``xs``, ``s``, ``m``) with ``vocab`` rows, tied like the tiny models."""
    return dict(TINY_ARCHS[size], vocab_size=vocab, tie_word_embeddings=True)


def attention_shape(model: dict) -> dict:
    """Query heads, KV heads and head dimension of a config's attention."""
    heads = int(model["num_attention_heads"])
    return {
        "heads": heads,
        "kv_heads": int(model.get("num_key_value_heads") or heads),
        "head_dim": int(model.get("head_dim") or model["hidden_size"] // heads),
    }


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run, the CPU smoke run and the GPU pytest run."""

    name: str
    model: dict  # Qwen2 config fields of the model setup writes
    model_dtype: str  # dtype it is saved in (the learner loads float32 master weights)
    # attention: the runs back-end at these head shapes on one tree-packed micro-batch
    attn_model: dict
    attn_tokens: int
    attn_dtype: str
    # learner: synthetic trees per step; tree packing against packing=none, then training steps
    prompts: int
    leaves: int
    depth: int
    seg_len: int
    prompt_len: int
    micro_batch_tokens: int
    steps: int  # optimizer steps (>= 2: the first is warm-up, not timed)
    # sampling
    s_prompts: int
    s_w: int
    s_d: int
    s_l: int
    s_b: int
    s_root: int
    s_max_batch: int
    s_dtype: str
    # weight sync
    bucket_mb: float
    pack_repeats: int
    two_rank_layers: int  # decoder layers' worth of tensors sent in the two-process check
    nccl_mib: tuple  # the sizes an NCCL group of one broadcasts, in MiB
    worker_sync_layers: int  # decoder layers' worth of tensors WorkerSync receives (with both embeddings)
    budgets: dict  # seconds per check (a check not named: its module's BUDGET_S)


SIZES = {
    "gpu": Sizes(
        name="gpu",
        model=seven_b_slice(2),
        model_dtype="bfloat16",
        attn_model=KNOWN_ARCHS[SEVEN_B],
        attn_tokens=8192,
        attn_dtype="bfloat16",
        prompts=4,
        leaves=8,
        depth=4,
        seg_len=256,
        prompt_len=512,
        micro_batch_tokens=8192,
        steps=2,
        s_prompts=8,
        s_w=16,
        s_d=4,
        s_l=32,
        s_b=2,
        s_root=2,
        s_max_batch=64,
        s_dtype="bfloat16",
        bucket_mb=64.0,
        pack_repeats=3,
        two_rank_layers=1,
        nccl_mib=(1024, 64),
        worker_sync_layers=1,
        budgets={},
    ),
    "smoke": Sizes(
        name="smoke",
        model=tiny("xs"),
        model_dtype="float32",
        attn_model=tiny("s"),
        attn_tokens=256,
        attn_dtype="float32",
        prompts=2,
        leaves=4,
        depth=2,
        seg_len=8,
        prompt_len=8,
        micro_batch_tokens=64,
        steps=2,
        s_prompts=2,
        s_w=4,
        s_d=2,
        s_l=8,
        s_b=2,
        s_root=2,
        s_max_batch=8,
        s_dtype="float32",
        bucket_mb=0.0625,
        pack_repeats=2,
        two_rank_layers=2,
        nccl_mib=(16, 1),
        worker_sync_layers=2,
        budgets={},  # every check: 60 s (see runner.SMOKE_BUDGET_S)
    ),
    # tests/gpu: small enough for seconds, big enough for several buckets and micro-batches
    "test": Sizes(
        name="test",
        model=tiny("s", vocab=4096),
        model_dtype="bfloat16",
        attn_model=tiny("s"),
        attn_tokens=1024,
        attn_dtype="bfloat16",
        prompts=4,
        leaves=4,
        depth=2,
        seg_len=16,
        prompt_len=16,
        micro_batch_tokens=256,
        steps=2,
        s_prompts=2,
        s_w=4,
        s_d=2,
        s_l=8,
        s_b=2,
        s_root=2,
        s_max_batch=8,
        s_dtype="bfloat16",
        bucket_mb=1.0,
        pack_repeats=1,
        two_rank_layers=1,
        nccl_mib=(64, 4),
        worker_sync_layers=1,
        budgets={},
    ),
}
