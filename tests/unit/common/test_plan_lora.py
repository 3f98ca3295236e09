"""The memory plan with ``learner.lora``: adapter-only gradients and moments, no reference copy, an
adapter checkpoint, and a 7B config that only fits one learner GPU with LoRA."""

from __future__ import annotations

import pytest
from test_plan import PRESET, _small

from common.config import load_config
from common.plan import GIB, make_plan


def test_lora_plan_by_hand(tmp_path):
    plan = make_plan(_small(tmp_path, "learner.lora.rank=8", "algo.kl_coef=0.01"))
    # rank 8 per layer: q 64+64, k 64+32, v 64+32, o 64+64 fan-in + fan-out; two layers
    adapter = 2 * 8 * (128 + 96 + 96 + 128)
    assert plan.arch.lora_params(8, ["q_proj", "k_proj", "v_proj", "o_proj"]) == adapter == 7168
    lr = plan.learner.parts
    assert lr["master_weights"] == 87104 * 4  # the frozen base stays whole
    assert lr["gradients"] == adapter * 4 and lr["optimizer"] == 2 * adapter * 4
    assert "reference_model" not in lr  # the base with adapters off is the reference
    c = plan.checkpoint
    assert c["size_gib"] * GIB == pytest.approx(87104 * 2 + adapter * (4 + 8))  # merged export + adapter
    assert c["resume_read_gib"] * GIB == pytest.approx(2 * adapter * 12)  # each rank: adapter + moments
    full = make_plan(_small(tmp_path, "algo.kl_coef=0.01")).learner.parts
    assert "reference_model" in full and full["gradients"] == 87104 * 4


def test_7b_fits_one_80gib_learner_gpu_only_with_lora():
    keys = [
        "learner.fsdp=false",
        "learner.num_workers=1",
        "learner.gpu_memory_gib=80",
        "learner.micro_batch_tokens=8192",
    ]
    full = make_plan(load_config(PRESET, keys))
    # fp32 master + gradients + AdamW moments of 7.6 B parameters: 148 GiB
    assert not full.learner.fits and "learner.fsdp=true" in full.learner.fix
    lora = make_plan(load_config(PRESET, [*keys, "learner.lora.rank=16"]))
    assert lora.learner.fits  # the frozen fp32 base, its bf16 copy and small adapters: 63 GiB
    assert lora.learner.parts["optimizer"] < 0.01 * full.learner.parts["optimizer"]
    small = make_plan(load_config(PRESET, [*keys, "learner.lora.rank=16", "learner.gpu_memory_gib=40"]))
    assert not small.learner.fits and "LoRA is not sharded" in small.learner.fix
