"""Every metric key a real training run writes is documented (common/metric_keys.py, from which
docs/metrics.md is generated): one step of the local driver on the session's vLLM CPU engine, with
the held-out evaluation on. The pipeline driver's own keys (generator/, pipeline/, queue/) are checked
against the training code's source by tests/unit/test_docs_generated.py."""

from __future__ import annotations

import json

import pytest
from run_configs import local_config

from cluster.local import train
from common.metric_keys import undocumented

pytestmark = pytest.mark.integration


def test_every_key_of_a_run_is_documented(tmp_path, tiny_model_dir, vllm_backend):
    import torch
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    version = vllm_backend.policy_version
    try:
        cfg = local_config(
            run, tiny_model_dir, "learner.total_steps=1", "eval.every_steps=1", "eval.max_problems=2"
        )
        assert train(cfg, backend=vllm_backend) == 0
    finally:  # the session's engine goes back with its original weights
        original = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        vllm_backend.update_weights(original.named_parameters(remove_duplicate=False), version)
        vllm_backend.reset_prefix_cache()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = {k for row in rows for k in row}
    assert {"rollout/reward", "tree/leaves", "learner/loss", "eval/accuracy", "reward/calls"} <= keys
    assert not undocumented(keys), "add to common/metric_keys.py, then run `python scripts/gen_docs.py`"
