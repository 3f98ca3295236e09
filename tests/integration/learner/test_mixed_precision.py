"""fp32 master weights under bf16 compute (learner.param_dtype, learner.mixed_precision).

With ``model.dtype=bfloat16`` and ``lr=1e-6`` a bf16 master weight of ~0.02 cannot move by an Adam step
of ~1e-6 (its spacing there is ~1.2e-4): most updates round away. An fp32 master keeps them; the
engines still get bf16 weights (``weights_for_sync`` in ``model.dtype``), and checkpoints export
``model.dtype`` with the fp32 master and optimizer state beside it (``sharded/``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from paths import REPO

from common.config import load_config
from learner.advantages import tree_advantages
from learner.rank import LearnerRank
from learner.synthetic import synthetic_trees

pytestmark = pytest.mark.integration


def _bf16_config(model_dir, param_dtype: str, lr: float = 1e-6):
    return load_config(
        None,
        [
            f"model.path={model_dir}",
            "model.dtype=bfloat16",
            "learner.mixed_precision=bf16",
            f"learner.param_dtype={param_dtype}",
            f"learner.lr={lr}",
            "learner.warmup_steps=1",
            "learner.prompts_per_step=4",
            "learner.mini_batch_prompts=4",
        ],
    )


def _one_step(model_dir, param_dtype: str):
    """A learner after one optimizer step, and the share of parameter elements that step changed
    (in the master weights and in the bf16 weights sent to engines)."""
    cfg = _bf16_config(model_dir, param_dtype)
    learner = LearnerRank(cfg.model, cfg.algo, cfg.learner)
    before = {n: p.detach().clone() for n, p in learner.module.named_parameters()}
    sent_before = dict(learner.weights_for_sync())
    trees = synthetic_trees(4, w=4, depth=2, seg_len=8, prompt_len=6, vocab_size=30, seed=1)
    for t in trees:
        for i, leaf in enumerate(t.leaves):
            leaf.reward = 1.0 if i % 2 else -1.0
    learner.train_step(trees, tree_advantages(trees, cfg.algo))
    assert learner.version == 1
    total = sum(p.numel() for p in before.values())
    master = sum(int((p.detach() != before[n]).sum()) for n, p in learner.module.named_parameters())
    sent = dict(learner.weights_for_sync())
    exported = sum(int((sent[n] != sent_before[n]).sum()) for n in before)
    return learner, master / total, exported / total


def test_fp32_master_keeps_small_updates_that_bf16_rounds_away(tiny_model_dir):
    torch.set_num_threads(2)
    old, old_master, old_sent = _one_step(tiny_model_dir, "bfloat16")  # the previous behaviour
    new, new_master, new_sent = _one_step(tiny_model_dir, "float32")
    try:
        assert next(old.module.parameters()).dtype == torch.bfloat16
        assert next(new.module.parameters()).dtype == torch.float32
        state = next(iter(new.optimizer.state.values()))
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
        # measured on the xs tiny model: 2.1 % (bf16 master) vs 99.9998 % (fp32 master)
        assert old_master < 0.10, old_master
        assert new_master >= 0.90, new_master
        # what engines receive: bf16, the master rounded; one 1e-6 step shows in few bf16 weights
        # (4.4 % measured), the rest accumulates in the master until it crosses a bf16 spacing
        sent = dict(new.weights_for_sync())
        assert {t.dtype for t in sent.values()} == {torch.bfloat16}
        for name, p in new.module.named_parameters():
            assert torch.equal(sent[name], p.detach().to(torch.bfloat16)), name
        assert "lm_head.weight" in sent  # tied to the embeddings, still sent
        assert old_sent <= new_sent
    finally:
        old.close()
        new.close()


def _optimizer_state(learner) -> dict[str, dict[str, torch.Tensor]]:
    state = learner.optimizer.state
    return {n: {k: v.clone() for k, v in state[p].items()} for n, p in learner.module.named_parameters()}


def test_checkpoint_exports_bf16_and_resumes_the_fp32_master(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    torch.set_num_threads(2)
    learner, _, _ = _one_step(tiny_model_dir, "float32")
    path = learner.save(tmp_path / "ckpt")
    exported = load_file(path / "model.safetensors")
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    assert json.loads((path / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    assert (path / "sharded").is_dir() and not (path / "optimizer.pt").exists()
    master = {n: p.detach().clone() for n, p in learner.module.named_parameters()}
    optim = _optimizer_state(learner)

    cfg = _bf16_config(tiny_model_dir, "float32")
    resumed = LearnerRank(cfg.model, cfg.algo, cfg.learner)
    assert resumed.load(tmp_path / "ckpt") == {}
    assert resumed.version == 1
    for name, p in resumed.module.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), master[name]), name
    resumed_optim = _optimizer_state(resumed)
    assert set(resumed_optim) == set(optim)
    for name, st in resumed_optim.items():
        for key, v in st.items():
            assert torch.equal(v, optim[name][key]), (name, key)
    learner.close()
    resumed.close()


ENGINE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np, torch
    from actors.backends.base import GenRequest
    from actors.backends.vllm_backend import VLLMBackend
    from sequences import generated_sequence
    from tests.integration.learner.test_mixed_precision import _one_step

    model_dir, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(2)
    learner, _, _ = _one_step(model_dir, "float32")
    cfg = learner.model_cfg
    from common.config import GeneratorConfig, SamplingConfig

    gen = GeneratorConfig(block_size=32, kv_cache_gib=0.0625, max_num_batched_tokens=4096)
    engine = VLLMBackend(model_dir, gen, SamplingConfig(), dtype=cfg.dtype, seed=0, max_model_len=512)
    received = []

    def recorded():
        for name, t in learner.weights_for_sync():
            received.append(str(t.dtype))
            yield name, t

    engine.update_weights(recorded(), learner.version)
    sent_embed = dict(learner.weights_for_sync())["model.embed_tokens.weight"]
    def embed(worker):
        for name, p in worker.model_runner.model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                return str(p.dtype), p.detach().cpu().float().tolist()
    dtype, values = engine.llm.collective_rpc(embed)[0]
    result = {"received": sorted(set(received)), "engine_embed_dtype": dtype,
              "embed_equal": bool(torch.equal(torch.tensor(values)[: len(sent_embed)], sent_embed.float())),
              "diffs": []}  # the engine pads the vocabulary: compare the model's rows
    prompt = [3, 4, 5, 6, 7, 8, 9]
    for seed in range(3):
        got = engine.generate([GenRequest(prompt, 24, seed=seed)])[0]
        seq = generated_sequence(prompt, got, version=1)
        mine = learner.compute_logprobs([seq])[0]
        result["diffs"].extend(np.abs(np.array(got.logprobs) - mine).tolist())
    engine.close()
    learner.close()
    json.dump(result, open(out, "w"))
    """
)


@pytest.mark.slow
def test_bf16_engine_receives_bf16_weights_and_matches_the_learner(tiny_model_dir, tmp_path):
    """A bf16 vLLM CPU engine (own process: the session's in-process engine is fp32) after a sync from
    an fp32-master learner computing in bf16: it holds exactly the bf16 weights sent, and its logprobs
    match the learner's. Both sides compute in bf16, whose kernels differ in summation order: the
    tolerance is that floor (a bf16 transformers model and the bf16 engine on identical weights differ
    by up to 3.7e-3, mean ~1e-3, on this model), not the 2e-3 of the fp32 sync test."""
    pytest.importorskip("vllm")
    script = tmp_path / "engine_run.py"
    script.write_text(ENGINE_SCRIPT)
    out = tmp_path / "result.json"
    path = os.pathsep.join([str(REPO), str(REPO / "tests" / "support")])  # this module imports paths
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="2", PYTHONPATH=path)
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["received"] == ["torch.bfloat16"]
    assert result["engine_embed_dtype"] == "torch.bfloat16" and result["embed_equal"]
    diffs = result["diffs"]
    assert len(diffs) >= 24
    assert max(diffs) < 1.5e-2 and sum(diffs) / len(diffs) < 4e-3, (max(diffs), sum(diffs) / len(diffs))
