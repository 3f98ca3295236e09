"""Learner ranks on the tiny model: data parallelism, accumulation, refused steps, exact resume."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from paths import REPO
from safetensors.torch import load_file, save_file

from common.config import AlgoConfig, LearnerConfig, ModelConfig
from learner.advantages import tree_advantages
from learner.batching import leaf_sequences
from learner.rank import LearnerRank, shard_for_rank
from learner.synthetic import synthetic_trees

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread here (ranks are processes); restored for the rest of the session."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _configs(model_dir, **learner):
    base = dict(lr=1e-3, warmup_steps=1, prompts_per_step=8, mini_batch_prompts=2, micro_batch_tokens=128)
    base.update(learner)
    return ModelConfig(path=str(model_dir)), AlgoConfig(), LearnerConfig(**base)


def _data(seed=1, num_prompts=8):
    trees = synthetic_trees(num_prompts, w=4, depth=2, seg_len=5, prompt_len=6, vocab_size=40, seed=seed)
    return trees, tree_advantages(trees, AlgoConfig())


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()  # FSDP2 shards are DTensors


def _grads(rank: LearnerRank) -> dict[str, torch.Tensor]:
    return {n: _full(p.grad) for n, p in rank.module.named_parameters() if p.grad is not None}


def _params(rank: LearnerRank) -> dict[str, torch.Tensor]:
    return {n: _full(p) for n, p in rank.module.named_parameters()}


def _one_mini_batch(rank: LearnerRank, trees, adv):
    """prepare + forward_backward + optim_step on one mini-batch; returns the synced gradients."""
    seqs = leaf_sequences(trees, adv)
    rank.prepare(seqs)
    rank.forward_backward(seqs, rank.global_token_count(seqs))
    grads = _grads(rank)
    rank.optim_step()
    return grads


def _dp_worker(rank_id: int, world: int, port: int, model_dir: str, out_dir: str, mode: str) -> None:
    torch.set_num_threads(1)
    trees, adv = _data()
    # FSDP2 runs on CPU with gloo too, which tests the sharded code path (not its bf16 policy)
    # (and one sequence per micro-batch there, to cover accumulation under sharding)
    extra = (
        {"fsdp": True, "activation_checkpointing": True, "micro_batch_tokens": 16} if mode == "fsdp" else {}
    )
    model_cfg, algo, lcfg = _configs(model_dir, **extra)
    r = LearnerRank(
        model_cfg,
        algo,
        lcfg,
        rank=rank_id,
        world_size=world,
        init_method=f"tcp://127.0.0.1:{port}",
        timeout_s=120,  # a collective mismatch fails the test instead of hanging it
    )
    half = len(trees[:4]) // world
    mine = slice(rank_id * half, (rank_id + 1) * half)
    grads = _one_mini_batch(r, trees[:4][mine], adv[:4][mine])
    # a whole train_step on the next 4 prompts: 2 mini-batches of 2 prompts, one prompt per rank in
    # each, so rank r holds prompts r, r + world, ... and train_step chunks them in order
    share = shard_for_rank(list(range(4, 8)), rank_id, world, lcfg.mini_batch_prompts)
    assert share == list(range(4 + rank_id, 8, world))
    metrics = r.train_step([trees[i] for i in share], [adv[i] for i in share])
    params = _params(r)
    synced = {name: t.clone() for name, t in r.weights_for_sync()}
    r.save(Path(out_dir) / "ckpt", extra={"world": world})
    # ranks with different numbers of micro-batches (FSDP: idle micro-batches keep collectives paired)
    uneven = leaf_sequences(trees[:1], adv[:1])[: 1 + 2 * rank_id]
    assert [len(x) for x in r.compute_logprobs(uneven)] == [s.response_len for s in uneven]
    r.prepare(uneven)
    r.forward_backward(uneven)
    assert r.optim_step() == 4
    if rank_id == 0:
        # weights_for_sync also names tied weights (lm_head.weight): compare on the parameters' names
        assert set(params) <= set(synced) and all(torch.equal(synced[n], params[n]) for n in params)
        assert "lm_head.weight" in synced  # the tiny model ties it to the embeddings: it must still be sent
        save_file(grads, str(Path(out_dir) / "grads.safetensors"))
        save_file(params, str(Path(out_dir) / "params.safetensors"))
        (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics))
    r.close()


@pytest.fixture(scope="module")
def single_rank_run(tiny_model_dir, tmp_path_factory):
    """The reference: one rank (no process group) over the full batch."""
    trees, adv = _data()
    r = LearnerRank(*_configs(tiny_model_dir))
    before = _params(r)
    grads = _one_mini_batch(r, trees[:4], adv[:4])
    metrics = r.train_step(trees[4:], adv[4:])
    return {"before": before, "grads": grads, "params": _params(r), "metrics": metrics, "version": r.version}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_ranks_equal_one_rank(single_rank_run, tiny_model_dir, tmp_path, mode):
    port = _free_port()
    mp.start_processes(
        _dp_worker, args=(2, port, str(tiny_model_dir), str(tmp_path), mode), nprocs=2, start_method="spawn"
    )
    grads = load_file(tmp_path / "grads.safetensors")
    params = load_file(tmp_path / "params.safetensors")
    assert set(grads) == set(single_rank_run["grads"])
    for name, g in single_rank_run["grads"].items():
        torch.testing.assert_close(
            grads[name], g, rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )
    moved = 0.0
    for name, p in single_rank_run["params"].items():
        delta_ref = p - single_rank_run["before"][name]
        delta_dp = params[name] - single_rank_run["before"][name]
        moved = max(moved, float(delta_ref.abs().max()))
        # Adam divides by sqrt(v): an element with a near-zero gradient turns a 1e-7 gradient difference
        # into a visible update difference, so the bound is 5% of one step (lr = 1e-3); the gradients
        # themselves are compared tightly above
        torch.testing.assert_close(
            delta_dp, delta_ref, rtol=1e-3, atol=5e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
    assert moved > 1e-4  # the comparison is about a real update
    assert single_rank_run["version"] == 3
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["learner/version"] == 3.0
    trainer = json.loads((tmp_path / "ckpt" / "ckpt-00000003" / "trainer.json").read_text())
    assert trainer["world_size"] == 2 and trainer["extra"] == {"world": 2}
    assert (tmp_path / "ckpt" / "ckpt-00000003" / "rng-rank1.pt").is_file()
    saved = load_file(tmp_path / "ckpt" / "ckpt-00000003" / "model.safetensors")
    for name, p in params.items():
        assert torch.equal(saved[name], p), name


def test_accumulation_equals_one_batch(single_rank_run, tiny_model_dir):
    # micro-batches of one sequence each (budget < any two sequences) vs the reference's bigger ones
    trees, adv = _data()
    r = LearnerRank(*_configs(tiny_model_dir, micro_batch_tokens=16))
    seqs = leaf_sequences(trees[:4], adv[:4])
    assert len(r._micro_batches(seqs)) == len(seqs)
    big = LearnerRank(*_configs(tiny_model_dir, micro_batch_tokens=10_000))
    assert len(big._micro_batches(seqs)) == 1
    g_small = _one_mini_batch(r, trees[:4], adv[:4])
    g_big = _one_mini_batch(big, trees[:4], adv[:4])
    for name, g in g_big.items():
        torch.testing.assert_close(
            g_small[name], g, rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )
        torch.testing.assert_close(
            single_rank_run["grads"][name], g, rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_logprobs_are_exact_under_padding(tiny_model_dir):
    trees, adv = _data(num_prompts=2)
    seqs = leaf_sequences(trees, adv)
    seqs[0].token_ids = seqs[0].token_ids[:-3]  # uneven lengths: the others get padded
    seqs[0].behavior_logprobs_R = seqs[0].behavior_logprobs_R[:-3]
    seqs[0].versions_R = seqs[0].versions_R[:-3]
    r = LearnerRank(*_configs(tiny_model_dir, micro_batch_tokens=10_000))
    batched = r.compute_logprobs(seqs)
    with torch.no_grad():
        for s, lp in zip(seqs, batched):
            logits = r.module(input_ids=torch.from_numpy(s.token_ids)[None]).logits[0, :-1].float()
            want = torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(s.token_ids[1:])[:, None])[:, 0]
            np.testing.assert_allclose(lp, want[s.prompt_len - 1 :].numpy(), rtol=0, atol=2e-5)
            assert len(lp) == s.response_len


def test_nonfinite_step_is_refused(tiny_model_dir, tmp_path):
    trees, adv = _data()
    r = LearnerRank(*_configs(tiny_model_dir))
    before = _params(r)
    bad = [a.copy() for a in adv[:4]]
    bad[1][0] = math.nan
    seqs = leaf_sequences(trees[:4], bad)
    r.prepare(seqs)
    r.forward_backward(seqs, r.global_token_count(seqs))
    assert r.optim_step() == 0
    assert r.skipped_steps == 1 and r.last_step["learner/skipped_steps"] == 1.0
    for name, p in _params(r).items():
        assert torch.equal(p, before[name]), name
    assert not r.optimizer.state  # AdamW never stepped: no moments, no step count
    assert r.scheduler.last_epoch == 0
    assert all(p.grad is None for p in r.module.parameters())
    # the next good step proceeds as the first one
    _one_mini_batch(r, trees[:4], adv[:4])
    assert r.version == 1 and r.skipped_steps == 1
    r.save(tmp_path, extra={})
    trainer = json.loads((tmp_path / "ckpt-00000001" / "trainer.json").read_text())
    assert trainer["version"] == 1 and trainer["skipped_steps"] == 1


def test_reference_kl_and_staleness(tiny_model_dir):
    model_cfg, _, lcfg = _configs(tiny_model_dir)
    r = LearnerRank(model_cfg, AlgoConfig(kl_coef=0.1), lcfg)
    trees, adv = _data(num_prompts=4)  # all sampled under version 0
    seqs = [leaf_sequences(trees[:2], adv[:2]), leaf_sequences(trees[2:], adv[2:])]
    r.prepare([s for mb in seqs for s in mb])
    for s in seqs[0] + seqs[1]:
        np.testing.assert_array_equal(s.ref_logprobs_R, s.prox_logprobs_R)  # same weights so far
    first = r.forward_backward(seqs[0])
    r.optim_step()
    second = r.forward_backward(seqs[1])
    r.optim_step()
    assert first["learner/ref_kl_k3"] < 1e-10 < second["learner/ref_kl_k3"]
    # the second mini-batch trains at version 1 on tokens sampled under version 0
    assert first["staleness/token_max"] == 0 and second["staleness/token_mean"] == 1.0
    assert r.version == 2


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, time, json
    import numpy as np, torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from common.config import AlgoConfig, LearnerConfig, ModelConfig
    from learner.advantages import tree_advantages
    from learner.synthetic import synthetic_trees
    from learner.rank import LearnerRank, shard_for_rank

    mode, model_dir, root, out = sys.argv[1:5]
    lcfg = LearnerConfig(lr=1e-3, warmup_steps=3, prompts_per_step=4, mini_batch_prompts=2, micro_batch_tokens=64)
    r = LearnerRank(ModelConfig(path=model_dir), AlgoConfig(), lcfg, seed=5)

    def step(i):
        trees = synthetic_trees(4, w=4, depth=2, seg_len=4, vocab_size=40, seed=100 + i)
        r.train_step(trees, tree_advantages(trees, AlgoConfig()))

    if mode == "resume":
        extra = r.load(root)
        start = extra["next"]
    else:
        start = 0
    for i in range(start, 4):
        step(i)
        if i == 1:
            torch.rand(7); np.random.rand(3)  # RNG used between steps must be restored too
            if mode == "first":
                r.save(root, extra={"next": 2})
                print("SAVED", flush=True)
                time.sleep(600)
    save_file({n: p.detach().contiguous() for n, p in r.module.named_parameters()}, out)
    json.dump({"version": r.version, "torch": torch.rand(4).tolist(), "numpy": np.random.rand(2).tolist()},
              open(out + ".json", "w"))
    """
)


def test_kill_after_save_then_resume_is_bit_identical(tiny_model_dir, tmp_path):
    script = tmp_path / "resume_run.py"
    script.write_text(RESUME_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    root, full_out, resumed_out = (
        tmp_path / "ckpt",
        tmp_path / "full.safetensors",
        tmp_path / "resumed.safetensors",
    )

    def launch(mode, out):
        return subprocess.Popen(
            [sys.executable, str(script), mode, str(tiny_model_dir), str(root), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
            env=env,
        )

    full = launch("full", full_out)  # uninterrupted run, concurrently
    first = launch("first", tmp_path / "unused.safetensors")
    try:
        deadline = time.time() + 300
        line = ""
        while "SAVED" not in line and time.time() < deadline and first.poll() is None:
            line = first.stdout.readline()
        assert "SAVED" in line, "the first run never reported its save"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    resumed = launch("resume", resumed_out)
    assert resumed.wait(timeout=300) == 0
    assert full.wait(timeout=300) == 0
    a, b = load_file(full_out), load_file(resumed_out)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    ja = json.loads(Path(str(full_out) + ".json").read_text())
    jb = json.loads(Path(str(resumed_out) + ".json").read_text())
    assert ja == jb and ja["version"] == 8
