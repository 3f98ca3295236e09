"""LoRA through peft on the tiny model: only adapters train (tree packing included), the real vLLM CPU
engine receives the merged weights and samples with the learner's logprobs, checkpoints hold the
adapter and resume it exactly, ``treepo merge-lora`` writes the merged model, bad settings are refused."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from actors.backends.base import GenRequest
from common.config import load_config
from common.errors import ConfigError, ModelError
from learner.advantages import tree_advantages
from learner.batching import LeafSequence
from learner.packing import make_packer
from learner.synthetic import synthetic_trees

pytestmark = pytest.mark.integration
pytest.importorskip("peft")

LORA = ["learner.lora.rank=4", "learner.lora.alpha=8"]


def _cfg(model_dir, *extra):
    return load_config(
        None,
        [
            f"model.path={model_dir}",
            "learner.lr=0.05",
            "learner.warmup_steps=1",
            "learner.prompts_per_step=4",
            "learner.mini_batch_prompts=4",
            "learner.micro_batch_tokens=256",
            *LORA,
            *extra,
        ],
    )


def _learner(cfg):
    from learner.rank import LearnerRank

    return LearnerRank(cfg.model, cfg.algo, cfg.learner, temperature=1.0)


def _trees(cfg, seed=1):
    trees = synthetic_trees(4, w=4, depth=2, seg_len=8, prompt_len=6, vocab_size=30, seed=seed)
    for t in trees:
        for i, leaf in enumerate(t.leaves):
            leaf.reward = 1.0 if (i + seed) % 2 else -1.0
    return trees, tree_advantages(trees, cfg.algo)


def _seq(prompt, tokens, logprobs=None):
    return LeafSequence(
        token_ids=np.array(list(prompt) + list(tokens), dtype=np.int64),
        prompt_len=len(prompt),
        behavior_logprobs_R=np.array(logprobs if logprobs is not None else [0.0] * len(tokens), np.float32),
        versions_R=np.zeros(len(tokens), dtype=np.int64),
        advantage=0.0,
    )


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_only_adapters_train_with_tree_packing_and_the_base_is_the_reference(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tiny_model_dir, "algo.kl_coef=0.05")
    assert cfg.learner.packing == "tree"
    r = _learner(cfg)
    try:
        trainable = {n for n, p in r.module.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        # adapters on the 4 attention projections of every layer, A and B each
        layers = r.module.config.num_hidden_layers
        assert len(trainable) == 4 * 2 * layers
        assert sum(len(g["params"]) for g in r.optimizer.param_groups) == len(trainable)
        # the memory plan counts the adapter parameters peft creates
        from common.plan import model_arch

        count = sum(p.numel() for p in r.module.parameters() if p.requires_grad)
        assert model_arch(cfg.model).lora_params(4, cfg.learner.lora.target_modules) == count
        assert r.ref_model is None  # the reference is the base: the same module, adapters off
        before = _snapshot(r.module)
        trees, adv = _trees(cfg)
        metrics = r.train_step(trees, adv)
        assert r.version == 1 and metrics["learner/forward_tokens"] > 0
        after = _snapshot(r.module)
        changed = {n for n in after if not torch.equal(before[n], after[n])}
        assert {n for n in changed if ".lora_B." in n}, "no adapter moved"
        assert changed <= trainable, f"frozen weights moved: {sorted(changed - trainable)[:3]}"

        # tree-packed logprobs of the adapted model equal one padded row per leaf
        seqs = [_seq([3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13]), _seq([3, 4, 5, 6, 7, 8], [9, 10, 14, 15])]
        packed = r.compute_logprobs(seqs)
        tree_packer = r.packer
        r.packer = make_packer("none", pad_id=int(r.module.config.pad_token_id or 0))
        try:
            padded = r.compute_logprobs(seqs)
        finally:
            r.packer = tree_packer
        for a, b in zip(packed, padded):
            np.testing.assert_allclose(a, b, atol=1e-5)

        # reference logprobs (adapters off) are the base model's, while the policy's have moved
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
        ids = torch.from_numpy(seqs[0].token_ids)[None]
        with torch.no_grad():
            logits = base(input_ids=ids).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0][seqs[0].prompt_len - 1 :]
        ref = r.compute_logprobs(seqs, reference=True)[0]
        np.testing.assert_allclose(ref, lp.numpy(), atol=1e-5)
        assert np.abs(packed[0] - ref).max() > 1e-3
    finally:
        r.close()


def test_engine_receives_merged_weights_and_matches_the_learner(vllm_backend, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tiny_model_dir)
    r = _learner(cfg)
    try:
        r.train_step(*_trees(cfg))
        sent = dict(r.weights_for_sync())
        # the names and shapes of the plain model (tied head included), and peft's own merge
        plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        names = {n: p.shape for n, p in plain.named_parameters(remove_duplicate=False)}
        assert {n: t.shape for n, t in sent.items()} == names
        reference = copy.deepcopy(r.lora).merge_and_unload().state_dict()
        for n, t in sent.items():
            torch.testing.assert_close(t, reference[n], atol=1e-6, rtol=0)
        assert not torch.equal(
            sent["model.layers.0.self_attn.q_proj.weight"],
            plain.state_dict()["model.layers.0.self_attn.q_proj.weight"],
        )
        # merging leaves the training model untouched: its adapters are still separate
        assert any(".lora_B." in n for n, _ in r.module.named_parameters())

        prompt = [3, 4, 5, 6, 7, 8, 9]
        before = vllm_backend.generate([GenRequest(prompt, 24)])[0]
        try:
            vllm_backend.update_weights(r.weights_for_sync(), r.version)
            vllm_backend.reset_prefix_cache()
            out = vllm_backend.generate([GenRequest(prompt, 24)])[0]
            learner_lp = r.compute_logprobs([_seq(prompt, out.token_ids, out.logprobs)])[0]
            np.testing.assert_allclose(np.array(out.logprobs), learner_lp, atol=2e-3)
            stale = r.compute_logprobs([_seq(prompt, before.token_ids)])[0]
            assert np.abs(stale - np.array(before.logprobs)).max() > 1e-2  # the update changed the policy
        finally:
            vllm_backend.update_weights(plain.named_parameters(remove_duplicate=False), 0)
            vllm_backend.reset_prefix_cache()
    finally:
        r.close()


def test_checkpoint_resumes_the_adapter_exactly_and_merge_lora_writes_the_merged_model(
    tiny_model_dir, tmp_path
):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from cluster.cli import main
    from learner import lora

    cfg = _cfg(tiny_model_dir)
    r = _learner(cfg)
    try:
        r.train_step(*_trees(cfg, seed=1))
        path = r.save(tmp_path / "ckpt", extra={"cursor": 3})
        adapter = path / "adapter"
        assert (adapter / "adapter_model.safetensors").is_file() and (
            adapter / "adapter_config.json"
        ).is_file()
        assert not (path / "sharded").exists()
        saved = load_file(adapter / "adapter_model.safetensors")
        assert saved and all("lora_" in k for k in saved)
        # model.safetensors is the merged model: transformers loads it as is
        merged = dict(r.weights_for_sync())
        exported = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).state_dict()
        for n, t in merged.items():
            torch.testing.assert_close(exported[n], t, atol=0, rtol=0)

        r2 = _learner(cfg)
        try:
            assert r2.load(tmp_path / "ckpt") == {"cursor": 3}
            assert r2.version == 1
            a, b = lora.adapter_state(r.lora), lora.adapter_state(r2.lora)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            # the same next step on both: exact resume (optimizer moments and schedule included)
            trees, adv = _trees(cfg, seed=2)
            r.train_step(trees, adv)
            trees, adv = _trees(cfg, seed=2)
            r2.train_step(trees, adv)
            a, b = lora.adapter_state(r.lora), lora.adapter_state(r2.lora)
            assert all(torch.equal(a[k], b[k]) for k in a)
        finally:
            r2.close()

        out = tmp_path / "merged"
        assert main(["merge-lora", str(path), "--out", str(out)]) == 0
        loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()
        for n, t in merged.items():
            torch.testing.assert_close(loaded[n], t, atol=1e-6, rtol=0)
        assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()

        # a LoRA checkpoint does not resume as a full fine-tune
        full = load_config(
            None,
            [f"model.path={tiny_model_dir}", "learner.prompts_per_step=4", "learner.mini_batch_prompts=4"],
        )
        r3 = _learner(full)
        try:
            with pytest.raises(ModelError, match="learner.lora"):
                r3.load(tmp_path / "ckpt")
        finally:
            r3.close()
    finally:
        r.close()


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["learner.lora.target_modules=[q_proj,lm_head]"], "'lm_head': LoRA on embeddings"),
        (["learner.lora.target_modules=[embed_tokens]"], "'embed_tokens'"),
        (["learner.lora.target_modules=[]"], "must name layers"),
        (["learner.lora.alpha=0"], "learner.lora.alpha=0.0 must be > 0"),
        (["learner.lora.rank=-1"], "learner.lora.rank=-1 is too small"),
        (["learner.fsdp=true", "learner.gpus_per_worker=1"], "learner.lora.rank > 0 with learner.fsdp=true"),
    ],
)
def test_unsupported_settings_are_refused_in_one_line(tiny_model_dir, overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        _cfg(tiny_model_dir, *overrides)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "targets, match",
    [
        ("[q_prj]", "'q_prj', which Qwen2ForCausalLM does not have"),
        ("[mlp]", r"matches model\.layers\.0\.mlp \(Qwen2MLP\), not a linear layer"),
    ],
)
def test_targets_the_model_lacks_are_refused(tiny_model_dir, targets, match):
    cfg = _cfg(tiny_model_dir, f"learner.lora.target_modules={targets}")
    with pytest.raises(ConfigError, match=match) as e:
        _learner(cfg)
    assert "\n" not in str(e.value) and "learner.lora.target_modules" in str(e.value)


def test_local_driver_trains_checkpoints_and_resumes_with_lora(tmp_path, tiny_model_dir, vllm_backend):
    """`treepo train` (driver=local) with LoRA: two steps, a checkpoint with the adapter, a resume to
    a third step whose merged weights reach the engine."""
    import json

    from run_configs import local_config as local_cfg
    from transformers import AutoModelForCausalLM

    from cluster.local import train

    def cfg(*extra):
        return local_cfg(tmp_path / "run", tiny_model_dir, *LORA, *extra)

    version = vllm_backend.policy_version
    try:
        assert train(cfg("learner.total_steps=2"), backend=vllm_backend) == 0
        ckpts = tmp_path / "run" / "checkpoints"
        latest = ckpts / (ckpts / "latest").read_text().strip()
        assert (latest / "adapter" / "adapter_model.safetensors").is_file()
        assert train(cfg("learner.total_steps=3", "resume=true"), backend=vllm_backend) == 0
        assert vllm_backend.policy_version == 3
        rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in rows] == [1, 2, 3]
        assert all(m["learner/skipped_steps"] == 0 for m in rows)
    finally:
        original = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        vllm_backend.update_weights(original.named_parameters(remove_duplicate=False), version)
        vllm_backend.reset_prefix_cache()


def _ddp_worker(rank_id: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    from pathlib import Path

    from safetensors.torch import save_file

    from learner import lora
    from learner.rank import LearnerRank, shard_for_rank

    torch.set_num_threads(1)
    cfg = _cfg(model_dir)
    r = LearnerRank(
        cfg.model,
        cfg.algo,
        cfg.learner,
        rank=rank_id,
        world_size=world,
        init_method=f"tcp://127.0.0.1:{port}",
        timeout_s=120,
    )
    trees, adv = _trees(cfg)
    share = shard_for_rank(list(range(4)), rank_id, world, cfg.learner.mini_batch_prompts)
    r.train_step([trees[i] for i in share], [adv[i] for i in share])
    r.save(Path(out_dir) / "ckpt")
    if rank_id == 0:
        save_file(lora.adapter_state(r.lora), str(Path(out_dir) / "adapter.safetensors"))
    r.close()


def test_two_gloo_ranks_train_the_adapter_like_one_rank(tiny_model_dir, tmp_path):
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from learner import lora

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _ddp_worker, args=(2, port, str(tiny_model_dir), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    cfg = _cfg(tiny_model_dir)
    r = _learner(cfg)
    try:
        before = lora.adapter_state(r.lora)
        r.train_step(*_trees(cfg))
        one = lora.adapter_state(r.lora)
    finally:
        r.close()
    two = load_file(tmp_path / "adapter.safetensors")
    assert one.keys() == two.keys()
    assert max(float((one[k] - before[k]).abs().max()) for k in one) > 1e-3  # a real update
    for k in one:  # Adam's first step is sign-like: a tiny gradient difference may move an element
        torch.testing.assert_close(two[k] - before[k], one[k] - before[k], rtol=1e-3, atol=2e-3)
    saved = load_file(tmp_path / "ckpt" / "ckpt-00000001" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(saved[k], two[k]) for k in saved)


@pytest.mark.slow
def test_ray_pipeline_trains_lora_and_engines_sample_the_merged_policy(
    tmp_path, tiny_model_dir, redis_server, monkeypatch
):
    """The asynchronous pipeline (real Ray, the generator's vLLM engine, the learner actor) with LoRA:
    synchronous schedule, so each step's trees were sampled under the previous step's merged weights;
    the checkpoint holds the adapter and a merged export equal to the adapter merged onto the base."""
    pytest.importorskip("ray")
    pytest.importorskip("vllm")
    from ray_nodes import in_process_ray, small_pipeline_overrides
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from cluster.pipeline.controller import run_pipeline
    from learner.checkpoint import require_checkpoint

    monkeypatch.setenv("TREEPO_TEST_LORA_REDIS_PASSWORD", redis_server.password)
    run = tmp_path / "run"
    cfg = load_config(
        None,
        small_pipeline_overrides(
            run,
            tiny_model_dir,
            "checkpoint.every_steps=1",
            "learner.total_steps=2",
            "algo.max_staleness=0",
            "learner.lr=0.01",
            # the random-init model never answers right: the length penalty makes leaf rewards differ
            "reward.overlong_buffer=48",
            f"queue.url={redis_server.url}",
            "queue.password_env=TREEPO_TEST_LORA_REDIS_PASSWORD",
            *LORA,
        ),
    )
    with in_process_ray(2):
        assert run_pipeline(cfg) == 0
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if m["step"] > 0]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert m["rollout/segment_version_min"] == m["rollout/segment_version_max"] == m["step"] - 1
    found = require_checkpoint(run / "checkpoints")
    assert found.step == 2
    adapter = load_file(found.path / "adapter" / "adapter_model.safetensors")
    assert any(float(t.abs().max()) > 0 for k, t in adapter.items() if "lora_B" in k)  # it trained
    import peft

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, str(found.path / "adapter")).merge_and_unload().state_dict()
    exported = found.model_state()
    for n, t in exported.items():
        torch.testing.assert_close(t, merged[n], atol=1e-6, rtol=0)


def test_bf16_export_with_fp32_adapters(tiny_model_dir, tmp_path):
    """model.dtype=bfloat16 with fp32 master weights and bf16 autocast: engines and the export get bf16
    merged weights, the adapter keeps fp32 (no sharded/ directory: the adapter is the trained state)."""
    from safetensors.torch import load_file

    cfg = _cfg(tiny_model_dir, "model.dtype=bfloat16", "learner.mixed_precision=bf16")
    r = _learner(cfg)
    try:
        r.train_step(*_trees(cfg))
        assert {t.dtype for _, t in r.weights_for_sync()} == {torch.bfloat16}
        path = r.save(tmp_path / "ckpt")
        assert not (path / "sharded").exists()
        assert {t.dtype for t in load_file(path / "model.safetensors").values()} == {torch.bfloat16}
        adapter = load_file(path / "adapter" / "adapter_model.safetensors")
        assert {t.dtype for t in adapter.values()} == {torch.float32}
        assert json.loads((path / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    finally:
        r.close()


def test_train_without_peft_is_refused_before_anything_starts(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import importlib.util

    from cluster.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    run = tmp_path / "run"
    assert main(["train", f"run_dir={run}", f"model.path={tiny_model_dir}", "driver=local", *LORA]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("treepo train: error: learner.lora.rank > 0 needs peft: pip install")
    assert not run.exists()


@pytest.mark.parametrize(
    "extra",
    [["learner.activation_checkpointing=true"], ["learner.packing=flat"], ["learner.packed_attention=mask"]],
)
def test_adapters_train_under_other_learner_settings(tiny_model_dir, extra):
    cfg = _cfg(tiny_model_dir, *extra)
    r = _learner(cfg)
    try:
        before = _snapshot(r.module)
        r.train_step(*_trees(cfg))
        after = _snapshot(r.module)
        changed = {n for n in after if not torch.equal(before[n], after[n])}
        assert changed and all(".lora_" in n for n in changed)
    finally:
        r.close()
