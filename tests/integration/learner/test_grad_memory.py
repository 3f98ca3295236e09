"""The gradient bytes an FSDP2 rank holds during gradient accumulation match the memory plan's
``gradients`` line (``common/plan.py``) for both ``learner.grad_sync`` values.

Two gloo ranks shard the tiny model; a mini-batch of several micro-batches runs and, after a
micro-batch that is not the last, every gradient byte the rank holds is counted: the sharded
gradients (``p.grad``'s local shard) and FSDP2's unsharded accumulation buffers (each ``FSDPParam``'s
``unsharded_accumulated_grad`` in the reduce dtype, or the unsharded parameter's ``.grad`` when the
compute dtype is the reduce dtype). ``every_micro_batch`` keeps ~4 x params / 2 bytes (fp32 shards),
``last_micro_batch`` ~4 x params (an unsharded fp32 gradient of the whole model).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from common.config import AlgoConfig, LearnerConfig, ModelConfig, load_config
from common.plan import make_plan
from learner.advantages import tree_advantages
from learner.batching import leaf_sequences
from learner.rank import LearnerRank
from learner.synthetic import synthetic_trees

pytestmark = pytest.mark.integration
WORLD = 2
MICRO_BATCH_TOKENS = 32  # padded rows of 16 tokens: two leaves per micro-batch, four per mini-batch
CASES = [("every_micro_batch", "bf16"), ("last_micro_batch", "bf16"), ("last_micro_batch", "none")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _learner(grad_sync: str, mixed_precision: str) -> LearnerConfig:
    return LearnerConfig(
        num_workers=WORLD,
        prompts_per_step=4,
        mini_batch_prompts=4,
        micro_batch_tokens=MICRO_BATCH_TOKENS,
        packing="none",
        fsdp=True,
        param_dtype="float32",
        mixed_precision=mixed_precision,
        grad_sync=grad_sync,
    )


def held_gradient_bytes(module: torch.nn.Module) -> int:
    """Bytes of every distinct storage holding a gradient of ``module`` (FSDP2-sharded) right now."""
    tensors = []
    for m in module.modules():
        state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
        group = getattr(state, "_fsdp_param_group", None)
        for fp in group.fsdp_params if group is not None else ():
            tensors.append(fp.unsharded_accumulated_grad)
            unsharded = getattr(fp, "_unsharded_param", None)
            tensors.append(unsharded.grad if unsharded is not None else None)
    for p in module.parameters():
        g = p.grad
        tensors.append(getattr(g, "_local_tensor", g))
    storages = {}
    for t in tensors:
        if t is not None:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _measure(rank: LearnerRank, seqs) -> list[int]:
    """Gradient bytes held before each micro-batch after the first (so after each non-last one)."""
    seen: list[int] = []
    collate = rank._collate

    def counting(all_seqs, group):
        seen.append(held_gradient_bytes(rank.module))
        return collate(all_seqs, group)

    rank._collate = counting
    rank.forward_backward(seqs, rank.global_token_count(seqs))
    rank._collate = collate
    after_last = held_gradient_bytes(rank.module)
    rank.optim_step()
    return seen[1:] + [after_last]


def _worker(rank_id: int, port: int, model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    trees = synthetic_trees(4, w=4, depth=2, seg_len=5, prompt_len=6, vocab_size=40, seed=3)
    adv = tree_advantages(trees, AlgoConfig())
    mine = slice(rank_id * 2, rank_id * 2 + 2)
    results = {}
    for grad_sync, mp_mode in CASES:
        r = LearnerRank(
            ModelConfig(path=model_dir, dtype="bfloat16"),
            AlgoConfig(),
            _learner(grad_sync, mp_mode),
            rank=rank_id,
            world_size=WORLD,
            init_method=f"tcp://127.0.0.1:{port}",
            timeout_s=30,
        )
        seqs = leaf_sequences(trees[mine], adv[mine])
        r.prepare(seqs)
        groups = len(r._micro_batches(seqs))
        held = _measure(r, seqs)
        results[f"{grad_sync}/{mp_mode}"] = {"micro_batches": groups, "held": held}
    (Path(out) / f"rank{rank_id}.json").write_text(json.dumps(results))
    r.close()  # the process group, which the three learners shared


@pytest.fixture(scope="module")
def measured(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("grad_memory")
    before = torch.get_num_threads()
    mp.start_processes(
        _worker, args=(_free_port(), str(tiny_model_dir), str(out)), nprocs=WORLD, start_method="spawn"
    )
    torch.set_num_threads(before)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _planned_gradients(model_dir, grad_sync: str, mixed_precision: str) -> float:
    keys = [
        f"model.path={model_dir}",
        "model.dtype=bfloat16",
        f"learner.num_workers={WORLD}",
        "learner.gpus_per_worker=1",
        "learner.fsdp=true",
        "learner.param_dtype=float32",
        f"learner.mixed_precision={mixed_precision}",
        f"learner.grad_sync={grad_sync}",
    ]
    return make_plan(load_config(None, keys)).learner.parts["gradients"]


@pytest.mark.parametrize("grad_sync, mixed_precision", CASES)
def test_held_gradients_match_the_plan(measured, tiny_model_dir, grad_sync, mixed_precision):
    planned = _planned_gradients(tiny_model_dir, grad_sync, mixed_precision)
    sharded = _planned_gradients(tiny_model_dir, "every_micro_batch", mixed_precision)
    for rank in measured:
        case = rank[f"{grad_sync}/{mixed_precision}"]
        assert case["micro_batches"] >= 3, case
        *non_last, after_last = case["held"]
        for held in non_last:  # after each micro-batch but the last: what the plan must count
            assert abs(held - planned) <= 0.1 * planned, (held, planned, grad_sync, mixed_precision)
        # after the last micro-batch (reduce-scattered) every mode holds the sharded gradient only
        assert abs(after_last - sharded) <= 0.1 * sharded, (after_last, sharded)
    if grad_sync == "last_micro_batch":  # the unsharded gradient: the world size times the shard
        assert planned == pytest.approx(WORLD * sharded)
