"""The memory plan (common/plan.py), ``treepo plan`` and the refusal by ``treepo train``."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main
from common.config import load_config
from common.errors import ConfigError
from common.plan import GIB, NCCL_BUFFERS_GIB, TINY_ARCHS, Node, check_fits, make_plan, model_arch

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


def test_gradient_line_follows_grad_sync(tmp_path):
    keys = ("learner.fsdp=true", "learner.gpus_per_worker=1")
    every = make_plan(_small(tmp_path, *keys)).learner
    assert every.parts["gradients"] == 87104 * 4 / 2  # reduce-scattered after each micro-batch: a shard
    last = make_plan(_small(tmp_path, *keys, "learner.grad_sync=last_micro_batch")).learner
    assert last.parts["gradients"] == 87104 * 4  # FSDP2's unsharded accumulation, fp32 (param_dtype)
    # under the bf16 policy the accumulation is in the reduce dtype, fp32, whatever param_dtype is
    bf16 = (
        "learner.mixed_precision=bf16",
        "learner.param_dtype=bfloat16",
        "learner.grad_sync=last_micro_batch",
    )
    assert make_plan(_small(tmp_path, *keys, *bf16)).learner.parts["gradients"] == 87104 * 4
    assert make_plan(_small(tmp_path, *keys, *bf16[:2])).learner.parts["gradients"] == 87104 * 2 / 2
    # DDP replicates the gradient either way
    ddp = make_plan(_small(tmp_path, "learner.grad_sync=last_micro_batch")).learner
    assert ddp.parts["gradients"] == 87104 * 4
    assert "learner.grad_sync=every_micro_batch" in every.notes[0]


def test_seven_b_keeps_its_gradient_sharded():
    """Qwen2.5-7B on 8 ranks: 3.5 GiB of sharded fp32 gradient against 28 GiB unsharded; the unsharded
    one does not fit an 80 GiB learner GPU beside the preset's activations, and the fix names the key."""
    sharded = make_plan(load_config(PRESET, [])).learner
    last = make_plan(load_config(PRESET, ["learner.grad_sync=last_micro_batch"])).learner
    assert sharded.parts["gradients"] / GIB == pytest.approx(3.55, abs=0.01)
    assert last.parts["gradients"] / GIB == pytest.approx(28.4, abs=0.05)
    assert sharded.fits and not last.fits and "set learner.grad_sync=every_micro_batch" in last.fix


def test_engine_staging_by_hand(tmp_path):
    # the largest tensor (a 64 x 128 MLP matrix in bf16) is 16384 bytes: under a 1 MiB bucket
    e = make_plan(_small(tmp_path, "sync.bucket_mb=1")).engine
    layer = 37120 * 2
    assert e.parts["sync_staging"] == 2 * (1 << 20) + NCCL_BUFFERS_GIB * GIB + layer
    # a bucket smaller than the largest tensor: that tensor travels alone, two can be in flight
    small = make_plan(_small(tmp_path, "sync.bucket_mb=0.001")).engine
    assert small.parts["sync_staging"] == 2 * 16384 + NCCL_BUFFERS_GIB * GIB + layer
    gloo = make_plan(_small(tmp_path, "sync.bucket_mb=1", "sync.backend=gloo")).engine
    assert gloo.parts["sync_staging"] == 2 * (1 << 20) + layer


def test_seven_b_staging_counts_the_embedding_buckets():
    plan = make_plan(load_config(PRESET, []))
    embedding = 152064 * 3584 * 2  # bf16, untied: the embedding and lm_head travel alone, 1 GiB each
    staging = plan.engine.parts["sync_staging"]
    assert staging >= 2 * embedding + NCCL_BUFFERS_GIB * GIB
    assert "buckets in flight 2.03" in plan.engine.notes[1]
    assert plan.sync_peak["engine_gpu_staging_gib"] == pytest.approx(staging / GIB)


def test_sides_per_node_type(tmp_path):
    nodes = {"engine": [Node("big", 80.0), Node("small", 1.0)], "learner": [Node("trainer", 80.0)]}
    plan = make_plan(
        _small(tmp_path, "learner.gpus_per_worker=1", "generators.gpus_per_engine=1"), nodes=nodes
    )
    assert [s.name for s in plan.engines] == ["engine on big (80 GiB GPUs)", "engine on small (1 GiB GPUs)"]
    assert [s.capacity / GIB for s in plan.engines] == [80.0, 1.0]
    assert plan.engines[0].fits and not plan.engines[1].fits and not plan.fits
    assert plan.refusals() == [plan.engines[1].fix] and plan.engines[1].fix.startswith("on node type small")
    assert plan.learners[0].name == "learner rank on trainer (80 GiB GPUs)"
    assert set(plan.as_dict()["engines_by_node"]) == {s.name for s in plan.engines}


def test_seven_b_preset_fits_an_a100_80gb_with_margin():
    cfg = load_config(PRESET, [])
    plan = check_fits(cfg)
    assert plan is not None and plan.fits
    assert plan.learner.total < 0.8 * plan.learner.capacity
    # beside vLLM's share: the CUDA context and the bucketed staging fit what is left
    outside = plan.engine.parts["cuda_context"] + plan.engine.parts["sync_staging"]
    assert outside < (1 - cfg.generators.gpu_memory_utilization) * plan.engine.capacity
    assert plan.checkpoint["resume_within_wait"]


def test_plan_command_prints_the_table_and_json(capsys):
    assert main(["plan", "--config", PRESET, "--cluster", "none"]) == 0
    out = capsys.readouterr().out
    assert "learner rank (per GPU, GiB)" in out and "fits on 80 GiB GPUs (A100-80GB)" in out
    assert main(["plan", "--config", PRESET, "--json", "--cluster", "none"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["refused"] == [] and data["model"]["params"] > 7e9
    assert (
        main(["plan", "--config", PRESET, "--cluster", "none", "generators.gpu_memory_utilization=0.99"]) == 1
    )
    assert "lower generators.gpu_memory_utilization" in capsys.readouterr().out


def test_plan_command_plans_each_node_type_of_the_cluster_yamls(capsys):
    """The 7B preset pins engines to generator_node and ranks to learner_node: cluster/a100.yaml offers
    generators 80 GB (p4de) and 40 GB (p4d) A100s; every size gets its own engine side."""
    main(["plan", "--config", PRESET, "--cluster", "cluster/a100.yaml", "--json"])
    data = json.loads(capsys.readouterr().out)
    engines = data["engines_by_node"]
    assert set(engines) == {
        "engine on gpu_generator_p4d (39.59 GiB GPUs)",
        "engine on gpu_generator (79.35 GiB GPUs)",
    }
    assert list(data["learner_ranks_by_node"]) == ["learner rank on gpu_learner (79.35 GiB GPUs)"]
    for side in (*engines.values(), *data["learner_ranks_by_node"].values()):
        assert side["parts_gib"]["gradients" if "gradients" in side["parts_gib"] else "sync_staging"] > 0
    # the 40 GB node leaves less than 4 GiB beside vLLM's 0.90: the staging decides
    p4d = engines["engine on gpu_generator_p4d (39.59 GiB GPUs)"]
    assert p4d["fits"] or "gpu_generator_p4d" in p4d["fix"] and "gpu_memory_utilization" in p4d["fix"]
    assert (
        main(
            [
                "plan",
                "--config",
                PRESET,
                "--cluster",
                "cluster/a100.yaml",
                "generators.gpu_memory_utilization=0.89",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "engine on gpu_generator_p4d (39.59 GiB GPUs)" in out and "gradients" in out and "sync staging" in out
    )
    # by default: the repository's cluster YAMLs, named with their file
    main(["plan", "--config", PRESET])
    assert "a100.yaml:gpu_generator_p4d" in capsys.readouterr().out


def test_plan_command_node_type_errors(tmp_path, capsys):
    odd = tmp_path / "odd.yaml"
    odd.write_text(
        "head_node_type: head\navailable_node_types:\n  head: {resources: {GPU: 0}}\n"
        "  w: {resources: {GPU: 8, generator_node: 8, learner_node: 8}, node_config: {InstanceType: x9.large}}\n"
    )
    assert main(["plan", "--config", PRESET, "--cluster", str(odd)]) == 2
    assert "--gpu-mem w=GIB" in capsys.readouterr().err
    assert main(["plan", "--config", PRESET, "--cluster", str(odd), "--gpu-mem", "w=24"]) == 1
    assert "engine on w (24 GiB GPUs)" in capsys.readouterr().out
    assert main(["plan", "--config", PRESET, "--cluster", str(tmp_path / "none.yaml")]) == 2
    assert main(["plan", "--config", PRESET, "--gpu-mem", "w=big"]) == 2


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
