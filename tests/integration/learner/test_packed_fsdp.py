"""Tree-packed micro-batches under FSDP2 (2 gloo ranks, bf16 policy): the runs' attention groups are
built once per micro-batch forward, not once per decoder layer.

FSDP2's input casting hands every wrapped layer a copy of its keyword arguments (dataclasses are
rebuilt with ``dataclasses.replace``), so a cache held in a plain field of the layout would start
empty in every layer; the groups live in a holder that the copies share.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from common.config import AlgoConfig, LearnerConfig, ModelConfig
from learner.advantages import tree_advantages
from learner.batching import leaf_sequences
from learner.rank import LearnerRank
from learner.synthetic import synthetic_trees

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank_id: int, world: int, port: int, model_dir: str, out_dir: str, checkpointing: bool) -> None:
    import learner.packed_attention as pa

    torch.set_num_threads(1)
    built = [0]
    group_runs = pa._group_runs

    def counted(*args, **kwargs):
        built[0] += 1
        return group_runs(*args, **kwargs)

    pa._group_runs = counted
    learner = LearnerConfig(
        lr=1e-3,
        warmup_steps=1,
        micro_batch_tokens=32,  # 2 micro-batches per rank, each a tree of 2 leaves
        mixed_precision="bf16",  # the policy whose input casting copies the keyword arguments
        fsdp=True,
        packing="tree",
        packed_attention="runs",
        activation_checkpointing=checkpointing,
    )
    r = LearnerRank(
        ModelConfig(path=model_dir, dtype="bfloat16"),
        AlgoConfig(),
        learner,
        rank=rank_id,
        world_size=world,
        init_method=f"tcp://127.0.0.1:{port}",
        timeout_s=120,
    )
    forwards = [0]
    forward = r.packer.forward

    def counted_forward(*args, **kwargs):
        forwards[0] += 1
        return forward(*args, **kwargs)

    r.packer.forward = counted_forward
    trees = synthetic_trees(4, w=3, depth=2, seg_len=6, prompt_len=8, vocab_size=40, seed=5)
    adv = tree_advantages(trees, AlgoConfig())
    mine = slice(rank_id * 2, rank_id * 2 + 2)
    seqs = leaf_sequences(trees[mine], adv[mine])
    r.prepare(seqs)
    r.forward_backward(seqs, r.global_token_count(seqs))
    r.optim_step()
    layers = len(r.module.model.layers)
    (Path(out_dir) / f"rank{rank_id}.json").write_text(
        json.dumps({"built": built[0], "forwards": forwards[0], "layers": layers})
    )
    r.close()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_groups_are_built_once_per_micro_batch_forward(tiny_model_dir, tmp_path, checkpointing):
    before = torch.get_num_threads()
    mp.start_processes(
        _worker,
        args=(2, _free_port(), str(tiny_model_dir), str(tmp_path), checkpointing),
        nprocs=2,
        start_method="spawn",
    )
    torch.set_num_threads(before)
    for rank_id in range(2):
        info = json.loads((tmp_path / f"rank{rank_id}.json").read_text())
        assert info["layers"] >= 2 and info["forwards"] >= 4, info  # >= 2 micro-batches, 2 passes
        assert info["built"] == info["forwards"], info  # once per micro-batch forward, not per layer
