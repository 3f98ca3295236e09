"""The CUDA paths of scripts/gpu_checks.py at small sizes: a bf16 FSDP2 learner step over NCCL and the
weight-sync pack/unpack round trip on CUDA tensors.

Needs CUDA (skipped otherwise, see conftest.py). On the GPU machine, which has python + torch only:
``PYTHONPATH=.gpu-vendor:. python3 -m pytest tests/gpu -q`` with ``.gpu-vendor`` built here by
``bash scripts/gpu_vendor.sh`` and carried along.
"""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def sizes(gpu_checks):
    return gpu_checks.SIZES["test"]


@pytest.fixture(scope="module")
def model_dir(gpu_checks, sizes, tmp_path_factory):
    """A random-init bf16 Qwen2 (4k vocabulary, 2 layers) in Hugging Face format, built on the GPU."""
    return gpu_checks.build_model_dir(
        tmp_path_factory.mktemp("gpu") / "model", sizes.model, sizes.model_dtype, "cuda"
    )


def test_bf16_fsdp2_learner_steps_are_finite_and_move_weights(gpu_checks, sizes, model_dir):
    d = gpu_checks.check_learner(model_dir, sizes, gpu=True)
    assert d["problems"] == []
    assert d["process_group"] == "nccl" and d["device"].startswith("cuda")
    assert d["param_type"] == "DTensor"  # sharded by fully_shard
    assert d["mp_param_dtype"] in (None, "torch.bfloat16")  # None: FSDP2's private state was not readable
    assert len(d["steps"]) == sizes.steps >= 2
    for i, step in enumerate(d["steps"]):
        assert math.isfinite(step["learner/loss"]) and math.isfinite(step["learner/grad_norm"])
        assert step["version"] == i + 1 and step["learner/skipped_steps"] == 0.0
        # every watched tensor (embedding, first attention, last MLP, final norm) moved in every step
        assert all(float(v) > 0 for v in step["max_abs_weight_change"].values()), step
    assert d["weights_for_sync"]["dtypes"] == ["torch.bfloat16"]  # model.dtype: shards cast before the gather
    assert d["tokens_per_s"] > 0 and d["peak_allocated_gib"] > 0


def test_weight_pack_round_trip_on_cuda_is_bit_exact(gpu_checks, sizes):
    d = gpu_checks.check_wsync_pack(sizes.model, sizes, gpu=True)
    assert d["problems"] == []  # every tensor bit-exact, in order, listed and streamed
    assert d["device"] == "cuda" and d["dtype"] == "torch.bfloat16"
    assert d["buckets"] > 2  # the 1 MiB buckets split the model: real packing, not one bucket
    assert d["zero_copy_bytes"] < d["bytes"]
    assert d["send_gbps"] > 0 and d["plain_copy_gbps"] > 0
