"""The learner → engine weight path: after ``update_weights(learner.weights_for_sync())`` the vLLM
engine's logprobs for the tokens it samples equal the learner's logprobs for the same tokens."""

from __future__ import annotations

import numpy as np
import pytest
from sequences import generated_sequence

from actors.backends.base import GenRequest
from common.config import load_config
from learner.synthetic import synthetic_trees

pytestmark = pytest.mark.integration


def test_engine_matches_learner_after_sync(vllm_backend, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from learner.advantages import tree_advantages
    from learner.rank import LearnerRank

    torch.set_num_threads(2)
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            "learner.lr=0.05",
            "learner.warmup_steps=1",
            "learner.prompts_per_step=4",
            "learner.mini_batch_prompts=4",
        ],
    )
    learner = LearnerRank(cfg.model, cfg.algo, cfg.learner, temperature=1.0)
    trees = synthetic_trees(4, w=4, depth=2, seg_len=8, prompt_len=6, vocab_size=30, seed=1)
    for t in trees:
        for i, leaf in enumerate(t.leaves):
            leaf.reward = 1.0 if i % 2 else -1.0
    learner.train_step(trees, tree_advantages(trees, cfg.algo))
    assert learner.version == 1
    prompt = [3, 4, 5, 6, 7, 8, 9]
    before = vllm_backend.generate([GenRequest(prompt, 24)])[0]
    try:
        vllm_backend.update_weights(learner.weights_for_sync(), learner.version)
        vllm_backend.reset_prefix_cache()
        assert vllm_backend.policy_version == 1
        out = vllm_backend.generate([GenRequest(prompt, 24)])[0]
        seq = generated_sequence(prompt, out, version=1)
        learner_lp = learner.compute_logprobs([seq])[0]
        np.testing.assert_allclose(np.array(out.logprobs), learner_lp, atol=2e-3)
        # and the old engine weights would NOT have matched (the update really changed the policy)
        old_seq = generated_sequence(prompt, before, version=0)
        assert np.abs(learner.compute_logprobs([old_seq])[0] - np.array(before.logprobs)).max() > 1e-2
    finally:
        original = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        vllm_backend.update_weights(original.named_parameters(remove_duplicate=False), 0)
        vllm_backend.reset_prefix_cache()
        learner.close()
