"""FSDP2 on CPU: ``fully_shard`` with a bf16 ``MixedPrecisionPolicy`` over 2 gloo ranks (spawned
processes), against one unsharded rank computing under bf16 autocast, and the sharded checkpoint
(torch.distributed.checkpoint) save -> load round trip, also resharded onto one unsharded rank.

torch 2.13's FSDP2 runs on CPU with gloo: sharding, the bf16 policy (parameters cast to bf16 for
compute, gradients reduced in fp32 into fp32 master shards) and DCP save/load all work there.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from common.config import AlgoConfig, LearnerConfig, ModelConfig
from learner.advantages import tree_advantages
from learner.batching import leaf_sequences
from learner.rank import LearnerRank
from learner.synthetic import synthetic_trees

pytestmark = pytest.mark.integration
LR = 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _configs(model_dir, fsdp: bool):
    learner = LearnerConfig(
        lr=LR,
        warmup_steps=1,
        prompts_per_step=4,
        mini_batch_prompts=4,
        micro_batch_tokens=128,
        mixed_precision="bf16",
        param_dtype="float32",
        fsdp=fsdp,
        packing="none",  # padded rows: this test is about sharding and precision, not packing
    )
    return ModelConfig(path=str(model_dir), dtype="bfloat16"), AlgoConfig(), learner


def _data():
    trees = synthetic_trees(4, w=4, depth=2, seg_len=5, prompt_len=6, vocab_size=40, seed=3)
    return trees, tree_advantages(trees, AlgoConfig())


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _step(rank: LearnerRank, trees, adv) -> tuple[dict, dict, float]:
    seqs = leaf_sequences(trees, adv)
    rank.prepare(seqs)
    rank.forward_backward(seqs, rank.global_token_count(seqs))
    grads = {n: _full(p.grad) for n, p in rank.module.named_parameters() if p.grad is not None}
    rank.optim_step()
    return grads, {n: _full(p) for n, p in rank.module.named_parameters()}, rank.last_step["learner/loss"]


def _optim_state(rank: LearnerRank) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in rank.module.named_parameters():
        for k, v in rank.optimizer.state[p].items():
            out[f"{n}/{k}"] = _full(v).reshape(-1).float()
    return out


def _worker(rank_id: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    trees, adv = _data()
    init = f"tcp://127.0.0.1:{port}"
    r = LearnerRank(
        *_configs(model_dir, True), rank=rank_id, world_size=world, init_method=init, timeout_s=120
    )
    assert type(next(r.module.parameters())).__name__ == "DTensor"
    assert next(r.module.parameters()).dtype == torch.float32  # the master shard
    half = len(trees) // world
    mine = slice(rank_id * half, (rank_id + 1) * half)
    grads, params, loss = _step(r, trees[mine], adv[mine])
    optim = _optim_state(r)
    sent = {n: t.clone() for n, t in r.weights_for_sync()}
    path = r.save(Path(out_dir) / "ckpt")
    # a fresh sharded learner in the same process group resumes from the sharded files
    again = LearnerRank(
        *_configs(model_dir, True), rank=rank_id, world_size=world, init_method=init, timeout_s=120
    )
    again.load(Path(out_dir) / "ckpt")
    resumed = {n: _full(p) for n, p in again.module.named_parameters()}
    resumed_optim = _optim_state(again)
    if rank_id == 0:
        save_file(grads, str(Path(out_dir) / "grads.safetensors"))
        save_file(params, str(Path(out_dir) / "params.safetensors"))
        save_file(optim, str(Path(out_dir) / "optim.safetensors"))
        save_file(resumed, str(Path(out_dir) / "resumed.safetensors"))
        save_file(resumed_optim, str(Path(out_dir) / "resumed_optim.safetensors"))
        (Path(out_dir) / "info.json").write_text(
            json.dumps(
                {
                    "loss": loss,
                    "version": again.version,
                    "ckpt": str(path),
                    "sent_dtypes": sorted({str(t.dtype) for t in sent.values()}),
                    "sent_equal": all(torch.equal(sent[n], params[n].to(torch.bfloat16)) for n in params),
                }
            )
        )
    again.close()


@pytest.fixture(scope="module")
def sharded_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    before = torch.get_num_threads()
    mp.start_processes(
        _worker, args=(2, _free_port(), str(tiny_model_dir), str(out)), nprocs=2, start_method="spawn"
    )
    torch.set_num_threads(before)
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def test_fsdp2_bf16_policy_step_equals_the_unsharded_autocast_step(sharded_run, tiny_model_dir):
    trees, adv = _data()
    ref = LearnerRank(*_configs(tiny_model_dir, False))  # one rank, no process group, autocast
    before = {n: _full(p) for n, p in ref.module.named_parameters()}
    ref_grads, ref_params, ref_loss = _step(ref, trees, adv)
    grads = load_file(sharded_run / "grads.safetensors")
    params = load_file(sharded_run / "params.safetensors")
    info = json.loads((sharded_run / "info.json").read_text())
    assert set(grads) == set(ref_grads)
    # bf16 compute on both sides, cast at different points (the policy casts every parameter,
    # autocast only matmul inputs): equal up to bf16 rounding, far below the gradient itself
    for name, g in ref_grads.items():
        assert grads[name].dtype == torch.float32
        assert _relative(grads[name], g) < 0.05, (name, _relative(grads[name], g))
    assert abs(info["loss"] - ref_loss) <= 1e-2 * max(1.0, abs(ref_loss))
    # Adam's first step is ~lr * sign(grad): the two steps agree on (nearly) every element
    agree = total = 0
    for name, p in ref_params.items():
        d_ref, d_dp = p - before[name], params[name] - before[name]
        agree += int(((d_ref - d_dp).abs() <= 0.2 * LR).sum())
        total += p.numel()
    assert agree / total > 0.95, agree / total
    assert info["sent_dtypes"] == ["torch.bfloat16"] and info["sent_equal"]
    ref.close()


def test_sharded_checkpoint_round_trip_and_reshard(sharded_run, tiny_model_dir):
    info = json.loads((sharded_run / "info.json").read_text())
    ckpt = Path(info["ckpt"])
    assert (ckpt / "sharded" / ".metadata").is_file() and not (ckpt / "optimizer.pt").exists()
    assert len(list((ckpt / "sharded").glob("*.distcp"))) == 2  # one file per rank
    params = load_file(sharded_run / "params.safetensors")
    optim = load_file(sharded_run / "optim.safetensors")
    # 2 ranks -> 2 ranks: exact
    assert info["version"] == 1
    resumed = load_file(sharded_run / "resumed.safetensors")
    resumed_optim = load_file(sharded_run / "resumed_optim.safetensors")
    for name, p in params.items():
        assert torch.equal(resumed[name], p), name
    for key, v in optim.items():
        assert torch.equal(resumed_optim[key], v), key
    # the export is the bf16 master rounding
    exported = load_file(ckpt / "model.safetensors")
    for name, p in params.items():
        if name in exported:
            assert torch.equal(exported[name], p.to(torch.bfloat16)), name
    # 2 ranks -> 1 unsharded rank (DCP reshards on load): exact too
    one = LearnerRank(*_configs(tiny_model_dir, False))
    one.load(ckpt.parent)
    assert one.version == 1
    for name, p in one.module.named_parameters():
        assert torch.equal(p.detach(), params[name]), name
    for key, v in _optim_state(one).items():
        assert torch.equal(v, optim[key]), key
    one.close()


def test_fsdp2_on_a_group_of_one_rank(tiny_model_dir, tmp_path):
    """One learner rank with learner.fsdp=true (the pipeline builds it a process group of one): a mesh
    of one, the whole batch on that rank; its step and export match the two-rank run's contract."""
    trees, adv = _data()
    before = torch.get_num_threads()
    mp.start_processes(
        _worker, args=(1, _free_port(), str(tiny_model_dir), str(tmp_path)), nprocs=1, start_method="spawn"
    )
    torch.set_num_threads(before)
    info = json.loads((tmp_path / "info.json").read_text())
    ref = LearnerRank(*_configs(tiny_model_dir, False))
    _, _, ref_loss = _step(ref, trees, adv)
    ref.close()
    assert abs(info["loss"] - ref_loss) <= 1e-2 * max(1.0, abs(ref_loss))
    assert info["version"] == 1 and info["sent_dtypes"] == ["torch.bfloat16"] and info["sent_equal"]
    assert len(list((Path(info["ckpt"]) / "sharded").glob("*.distcp"))) == 1
