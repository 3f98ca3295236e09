"""The presets in ``configs/``: each loads strictly, documents itself, and the cluster presets carry
the production settings; the 7B TreePO preset carries the paper's settings (docs/algorithm.md).

The run line each cluster preset's header documents is parsed with ``treepo train``'s own argument
parser and its overrides are loaded on top of the preset, so the documented command is checked too.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
from paths import REPO

from common.config import ConfigError, flat_config, load_config

ROOT = REPO
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
ids = [p.name for p in PRESETS]
HEAD_URL = "redis://10.0.3.7:6390/0"  # what `cluster/head_redis.sh exec` exports on the head


@pytest.fixture(autouse=True)
def _no_queue_url(monkeypatch):
    monkeypatch.delenv("TREEPO_QUEUE_URL", raising=False)


def header(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip() if line.startswith("# ") else line[1:])
    return "\n".join(lines)


def cluster_presets() -> list[Path]:
    return [p for p in PRESETS if load_config(p).generators.gpus_per_engine > 0]  # the GPU presets


def run_line(path: Path) -> list[str]:
    """The `ray job submit ...` command of a preset's header, as argv (continuations joined)."""
    text = header(path).replace("\\\n", " ")
    lines = [line for line in text.splitlines() if line.lstrip().startswith("ray job submit")]
    assert len(lines) == 1, f"{path.name}: the header must show one `ray job submit` line"
    return shlex.split(lines[0])


def test_there_are_cluster_presets():
    names = {p.name for p in cluster_presets()}
    assert names >= {"qwen2.5-7b-treepo.yaml", "qwen2.5-7b-grpo.yaml", "qwen2.5-1.5b-treepo.yaml"}


@pytest.mark.parametrize("path", PRESETS, ids=ids)
def test_preset_loads_strictly_and_has_a_header(path, tmp_path):
    load_config(path)
    assert path.read_text().startswith("# "), f"{path.name}: start with a header comment"
    assert len(header(path).splitlines()) >= 2
    broken = tmp_path / path.name  # the same preset plus one misspelled key is refused
    broken.write_text(path.read_text() + "\nlearner_:\n  lr: 1.0e-6\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(broken)


@pytest.mark.parametrize("path", cluster_presets(), ids=lambda p: p.name)
def test_cluster_preset_production_settings(path, monkeypatch):
    cfg = load_config(path)
    assert cfg.driver == "ray"
    assert cfg.generators.gpus_per_engine >= 1 and cfg.learner.gpus_per_worker >= 1
    assert cfg.learner.fsdp is True and cfg.learner.mixed_precision == "bf16"
    assert cfg.model.dtype == "bfloat16"
    assert cfg.generators.backend == "vllm" and cfg.generators.enforce_eager is False
    # absolute, on the shared file system the cluster YAMLs mount on every node
    assert Path(cfg.run_dir).is_absolute() and cfg.run_dir.startswith("/mnt/shared/")
    # the queue: the head's Redis from the environment `head_redis.sh exec` sets, an explicit
    # override wins, and without either it is '' (the pipeline refuses that on several nodes)
    assert cfg.queue.url == "" and cfg.queue.password_env == "TREEPO_REDIS_PASSWORD"
    monkeypatch.setenv("TREEPO_QUEUE_URL", HEAD_URL)
    assert load_config(path).queue.url == HEAD_URL
    assert load_config(path, ["queue.url=redis://10.0.9.9:6390/0"]).queue.url == "redis://10.0.9.9:6390/0"
    # the header's GPU count is what the preset asks for
    gpus = int(re.search(r"^GPUs: (\d+)", header(path), re.M).group(1))
    assert gpus == (
        cfg.generators.num * cfg.generators.gpus_per_engine
        + cfg.learner.num_workers * cfg.learner.gpus_per_worker
    )
    text = header(path)
    for topic in ("Splitting generators vs learners", "What to watch", "--resume"):
        assert topic in text, f"{path.name}: the header should cover {topic!r}"


@pytest.mark.parametrize("path", cluster_presets(), ids=lambda p: p.name)
def test_header_run_line_works(path, monkeypatch):
    from cluster.commands import train as train_cmd

    argv = run_line(path)
    assert argv[:3] == ["ray", "job", "submit"]
    assert argv[argv.index("--address") + 1] == "http://127.0.0.1:8265"  # `ray dashboard`'s tunnel
    assert argv[argv.index("--working-dir") + 1] == "."
    entry = argv[argv.index("--") + 1 :]
    assert entry[:3] == ["bash", "cluster/head_redis.sh", "exec"]
    assert entry[3:7] == ["python", "-m", "cluster", "train"]
    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    args = parser.parse_args(entry[7:])
    assert Path(args.config) == path.relative_to(ROOT)
    monkeypatch.setenv("TREEPO_QUEUE_URL", HEAD_URL)
    cfg = load_config(ROOT / args.config, args.overrides)
    assert cfg.queue.url == HEAD_URL
    assert cfg == load_config(path)  # the documented counts are the preset's own


def test_7b_treepo_has_the_paper_settings():
    cfg = load_config(ROOT / "configs" / "qwen2.5-7b-treepo.yaml")
    # docs/algorithm.md, "Terms and settings": Qwen2.5-7B base; system prompt; max prompt 1024; w=16,
    # d x l = 14 x 512, b=2; temperature 1.0, top_p 1.0; lr 1e-6, 10 warm-up steps, weight decay
    # 0.1, grad clip 1.0; 512 prompts per step after filtering; 1 epoch; bf16.
    assert cfg.model.path == "Qwen/Qwen2.5-7B"
    assert cfg.data.system_prompt == "Please reason step by step, and put your final answer within \\boxed{}."
    assert cfg.data.max_prompt_tokens == 1024
    assert (cfg.tree.mode, cfg.tree.w, cfg.tree.d, cfg.tree.l, cfg.tree.b) == ("tree", 16, 14, 512, 2)
    assert (cfg.sampling.temperature, cfg.sampling.top_p) == (1.0, 1.0)
    assert cfg.learner.lr == 1e-6 and cfg.learner.warmup_steps == 10
    assert cfg.learner.weight_decay == 0.1 and cfg.learner.grad_clip == 1.0
    assert cfg.learner.prompts_per_step == 512 and cfg.data.epochs == 1
    assert cfg.model.dtype == "bfloat16" and cfg.learner.mixed_precision == "bf16"
    # docs/algorithm.md, "Terms and settings": Lmax = d*l = 7168; root divergence 2 (fixed) for "TreePO fixed init"
    assert cfg.tree.max_response_tokens == 7168
    assert (cfg.tree.root_divergence_min, cfg.tree.root_divergence_max) == (2, 2)
    # docs/algorithm.md, "Reward and loss": +1/-1 reward, DAPO overlong penalty over the last 512 tokens;
    # PPO-clip with clip-higher 0.2/0.28, dual clip 10, no KL; one epoch; mini-batches of 32 prompts
    assert (cfg.reward.fn, cfg.reward.correct, cfg.reward.wrong, cfg.reward.overlong_buffer) == (
        "math",
        1.0,
        -1.0,
        512,
    )
    assert (cfg.algo.clip_low, cfg.algo.clip_high, cfg.algo.dual_clip, cfg.algo.kl_coef) == (
        0.2,
        0.28,
        10.0,
        0.0,
    )
    assert cfg.learner.ppo_epochs == 1 and cfg.learner.mini_batch_prompts == 32
    # docs/algorithm.md, "Advantages": the release's rule (average aggregation, no subgroup std filter,
    # batch whitening) with prompt-level dynamic sampling
    assert cfg.algo.advantage == "treepo" and cfg.algo.aggregation == "average"
    assert cfg.algo.subgroup_std_filter is False and cfg.algo.whiten is True
    assert cfg.algo.dynamic_sampling is True
    # docs/algorithm.md, "Sampling a tree": fixed_avg allocation; fallback from answered-or-EOS leaves; the
    # release's answer policy; repetition = a 32-character substring >= 8 times in a segment
    assert cfg.tree.allocation == "fixed_avg" and cfg.tree.fallback == "answered_or_eos"
    assert cfg.tree.answer_policy == "boxed_and_eos_first"
    assert cfg.tree.repetition_check and cfg.tree.repetition_substring_chars == 32
    assert cfg.tree.repetition_min_count == 8


def test_grpo_baseline_differs_only_in_sampling_and_advantage():
    treepo = flat_config(load_config(ROOT / "configs" / "qwen2.5-7b-treepo.yaml"))
    grpo = flat_config(load_config(ROOT / "configs" / "qwen2.5-7b-grpo.yaml"))
    differ = {k for k in treepo if treepo[k] != grpo[k]}
    assert grpo["tree.mode"] == "flat" and grpo["algo.advantage"] == "grpo" and grpo["algo.whiten"] is False
    # tree-only knobs (unused by flat sampling) may differ; nothing that shapes training may
    tree_only = {
        "tree.root_divergence_min",
        "tree.root_divergence_max",
        "tree.allocation",
        "tree.remainder",
        "tree.fallback",
        "tree.b",
        "tree.align_segments_to_blocks",
    }
    assert differ - tree_only == {"run_dir", "tree.mode", "algo.advantage", "algo.whiten"}


def test_1_5b_preset_fits_one_8_gpu_node():
    cfg = load_config(ROOT / "configs" / "qwen2.5-1.5b-treepo.yaml")
    assert cfg.model.path == "Qwen/Qwen2.5-1.5B"
    used = (
        cfg.generators.num * cfg.generators.gpus_per_engine
        + cfg.learner.num_workers * cfg.learner.gpus_per_worker
    )
    assert used == 8
    assert cfg.generators.num > cfg.learner.num_workers  # generation dominates
    assert not cfg.generators.ray_resources and not cfg.learner.ray_resources  # any one node
    assert cfg.learner.mini_batch_prompts % cfg.learner.num_workers == 0
