"""The memory plan (common/plan.py), ``treepo plan`` and the refusal by ``treepo train``."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main
from common.config import load_config
from common.errors import ConfigError
from common.plan import GIB, TINY_ARCHS, check_fits, make_plan, model_arch

PRESET = "configs/qwen2.5-7b-treepo.yaml"


def _small(tmp_path, *overrides):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    arch = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        tie_word_embeddings=False,
    )
    (model / "config.json").write_text(json.dumps(arch))
    keys = [
        f"model.path={model}",
        "model.dtype=bfloat16",
        "learner.num_workers=2",
        "learner.mini_batch_prompts=8",
        "learner.micro_batch_tokens=256",
        "learner.activation_checkpointing=true",
        *overrides,
    ]
    return load_config(None, keys)


def test_small_model_plan_by_hand(tmp_path):
    cfg = _small(tmp_path)
    plan = make_plan(cfg)
    # per layer: q 64*64+64, k = v = 64*32+32, o 64*64, MLP 3*64*128, two norms 2*64
    assert plan.arch.layer_params() == 4160 + 2080 + 2080 + 4096 + 24576 + 128 == 37120
    # two layers, untied embeddings and head 2*100*64, final norm 64
    assert plan.params == 2 * 37120 + 2 * 6400 + 64 == 87104
    lr = plan.learner.parts
    assert lr["master_weights"] == lr["gradients"] == 87104 * 4  # DDP (fsdp off): not sharded
    assert lr["optimizer"] == 2 * 87104 * 4
    # checkpointing: one bf16 hidden state per layer and token, plus one layer recomputed
    assert lr["activations"] == 2 * 256 * 64 * 2 + 256 * (9 * 64 + 2 * 32 + 4 * 128) * 2
    assert lr["logits"] == 256 * 100 * 14
    assert "bf16_compute_copy" not in lr  # mixed_precision none
    e = plan.engine.parts
    assert e["weights"] == 87104 * 2  # model.dtype bfloat16
    # the checkpoint: bf16 export + fp32 master and AdamW moments (dtypes differ: sharded/)
    c = plan.checkpoint
    assert c["size_gib"] * GIB == pytest.approx(87104 * (2 + 4 + 8))
    sharded = make_plan(_small(tmp_path, "learner.fsdp=true", "learner.gpus_per_worker=1")).learner.parts
    assert sharded["master_weights"] == 87104 * 4 / 2


def test_seven_b_preset_fits_an_a100_80gb_with_margin():
    cfg = load_config(PRESET, [])
    plan = check_fits(cfg)
    assert plan is not None and plan.fits
    assert plan.learner.total < 0.6 * plan.learner.capacity
    # beside vLLM's share: the CUDA context and the bucketed staging, well under what is left
    outside = plan.engine.parts["cuda_context"] + plan.engine.parts["sync_staging"]
    assert outside < 0.5 * (1 - cfg.generators.gpu_memory_utilization) * plan.engine.capacity
    assert plan.checkpoint["resume_within_wait"]


def test_plan_command_prints_the_table_and_json(capsys):
    assert main(["plan", "--config", PRESET]) == 0
    out = capsys.readouterr().out
    assert "learner rank (per GPU, GiB)" in out and "fits on 80 GiB GPUs (A100-80GB)" in out
    assert main(["plan", "--config", PRESET, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["refused"] == [] and data["model"]["params"] > 7e9
    assert main(["plan", "--config", PRESET, "generators.gpu_memory_utilization=0.99"]) == 1
    assert "lower generators.gpu_memory_utilization" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override, key",
    [
        ("learner.micro_batch_tokens=65536", "learner.micro_batch_tokens"),
        ("learner.activation_checkpointing=false", "learner.activation_checkpointing"),
        ("generators.gpu_memory_gib=16", "generators.gpus_per_engine"),
        ("generators.gpu_memory_utilization=0.99", "generators.gpu_memory_utilization"),
    ],
)
def test_train_refuses_a_plan_that_does_not_fit_before_starting(tmp_path, capsys, override, key):
    run_dir = tmp_path / "run"
    rc = main(["train", "--config", PRESET, f"run_dir={run_dir}", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "memory plan" in err[0] and key in err[0], err
    assert not run_dir.exists()  # nothing started: no run directory, no Ray, no Redis


def test_check_is_skipped_on_cpu_and_tables_match_the_tiny_sizes():
    assert check_fits(load_config(None, [])) is None
    from common.tiny import SIZES

    assert TINY_ARCHS == SIZES
    with pytest.raises(ConfigError, match="no config.json"):
        model_arch(load_config(None, ["model.path=nobody/no-such-model"]).model)
