"""Both generation backends against a plain transformers forward pass on the same weights (float32),
the vLLM weight-update hook, and end-to-end tree sampling on the vLLM CPU engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.backends.base import GenRequest
from actors.sampler import TreeSampler
from common.config import GeneratorConfig, SamplingConfig, TreeConfig
from common.models import eos_token_ids, load_model, load_tokenizer
from tests.integration.conftest import restored

pytestmark = pytest.mark.integration

ATOL = 2e-3  # float32 engines vs one unpadded transformers forward


def prompts(tokenizer, n=3):
    texts = ["12+7=", "3*4+5*6=", "(8-3)*2+91="][:n]
    return [tokenizer(t)["input_ids"] for t in texts]


def reference_logprobs(model, prompt_ids, token_ids, temperature=1.0):
    ids = torch.tensor([list(prompt_ids) + list(token_ids)])
    with torch.inference_mode():
        logits = model(ids).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt_ids) - 1 : -1] / temperature, dim=-1)
    return lp.gather(-1, torch.tensor(token_ids)[:, None]).squeeze(-1).numpy()


def check_against_reference(backend, model, reqs, temperature):
    results = backend.generate(reqs)
    assert len(results) == len(reqs)
    for req, res in zip(reqs, results):
        assert 1 <= len(res.token_ids) <= req.max_tokens and len(res.logprobs) == len(res.token_ids)
        assert res.finish_reason == ("stop" if res.token_ids[-1] in backend.eos_ids else "length")
        ref = reference_logprobs(model, req.prompt_ids, res.token_ids, temperature)
        np.testing.assert_allclose(np.array(res.logprobs), ref, atol=ATOL)
    return results


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype="float32"), load_tokenizer(str(tiny_model_dir))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_logprobs_match_transformers(vllm_backend, reference, temperature):
    model, tok = reference
    reqs = [GenRequest(p, 24) for p in prompts(tok)] * 2
    with restored(vllm_backend, SamplingConfig(temperature=temperature)):
        results = check_against_reference(vllm_backend, model, reqs, temperature)
    assert vllm_backend.counters.decoded_tokens >= sum(len(r.token_ids) for r in results)


def test_hf_logprobs_match_transformers(tiny_model_dir, reference):
    from actors.backends.hf_backend import HFBackend

    model, tok = reference
    backend = HFBackend(
        str(tiny_model_dir), GeneratorConfig(backend="hf"), SamplingConfig(temperature=0.7), seed=0
    )
    reqs = [GenRequest(p, 20, seed=i if i % 2 else None) for i, p in enumerate(prompts(tok) * 2)]
    check_against_reference(backend, model, reqs, 0.7)
    # per-request seeds make a request reproducible
    a = backend.generate([GenRequest(prompts(tok)[0], 16, seed=5)])[0].token_ids
    b = backend.generate([GenRequest(prompts(tok)[0], 16, seed=5)])[0].token_ids
    assert a == b


def test_vllm_weight_update_hook(vllm_backend, reference, tiny_model_dir):
    model, tok = reference
    original = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.2 * v.std() * torch.randn(v.shape, generator=g) for k, v in original.items()}
    new_model = load_model(str(tiny_model_dir), dtype="float32")
    new_model.load_state_dict(perturbed)
    reqs = [GenRequest(p, 16) for p in prompts(tok)]
    with restored(vllm_backend):
        try:
            vllm_backend.update_weights(perturbed.items(), version=7)
            assert vllm_backend.policy_version == 7
            results = check_against_reference(vllm_backend, new_model, reqs, 1.0)
            old = reference_logprobs(model, reqs[0].prompt_ids, results[0].token_ids)
            assert np.abs(np.array(results[0].logprobs) - old).max() > 10 * ATOL  # the update took effect
        finally:
            vllm_backend.update_weights(original.items(), version=0)
    check_against_reference(vllm_backend, model, reqs, 1.0)


@pytest.mark.parametrize("expansion", ["level", "barrier_free"])
def test_vllm_tree_sampling_end_to_end(vllm_backend, tiny_model_dir, expansion):
    tok = load_tokenizer(str(tiny_model_dir))
    eos = eos_token_ids(str(tiny_model_dir))
    cfg = TreeConfig(w=8, d=2, l=32, b=2, max_response_tokens=64, align_segments_to_blocks=True, seed=1)
    sampling = SamplingConfig(expansion=expansion)
    sampler = TreeSampler(vllm_backend, cfg, sampling, eos, lambda ids: tok.decode(ids))
    before = vllm_backend.counters.as_dict()
    items = [(f"p{i}", p, {"answer": "0"}) for i, p in enumerate(prompts(tok))]
    trees = list(sampler.run(items, max_in_flight=2))  # the third tree enters when one leaves
    assert sorted(t.prompt_id for t in trees) == ["p0", "p1", "p2"]
    for tree in trees:
        tree.validate()
        assert len(tree.leaves) == cfg.w
        assert all(s.version == vllm_backend.policy_version for s in tree.segments)
        assert max(s.depth for s in tree.segments) <= cfg.d
        for s in tree.segments:  # inner segments end where (path length - 1) is a block multiple
            if any(c.parent_id == s.node_id for c in tree.segments):
                end = len(tree.prompt_ids) + sum(len(x.token_ids) for x in tree.path(s.node_id))
                assert (end - 1) % vllm_backend.block_size == 0
    stats = sampler.stats
    assert stats.prefill_tokens_cached > 0  # children reuse their parents' KV blocks
    assert stats.decoded_tokens == vllm_backend.counters.decoded_tokens - before["decoded_tokens"]
    assert stats.requests == vllm_backend.counters.requests - before["requests"]
    calls = vllm_backend.counters.calls - before["calls"]
    assert calls == (stats.steps if expansion == "level" else 0)  # barrier-free: the request stream
    assert vllm_backend.counters.engine_steps > before["engine_steps"]
    assert sampler.requests_in_engine == 0 and vllm_backend.unfinished_requests == 0


def grow(backend, cfg, sampling, items, eos, decode, max_in_flight):
    """Trees by id and the engine's batch occupancy (requests per engine step) while they grew."""
    sampler = TreeSampler(backend, cfg, sampling, eos, decode)
    backend.reset_prefix_cache()
    steps, reqs = backend.counters.engine_steps, backend.counters.engine_requests
    trees = {t.tree_id: t for t in sampler.run(items, max_in_flight=max_in_flight)}
    steps = backend.counters.engine_steps - steps
    return trees, (backend.counters.engine_requests - reqs) / steps


def test_vllm_barrier_free_grows_the_same_trees_as_level(vllm_backend, tiny_model_dir):
    """Per-request seeds: a request samples from its own seed whatever shares the engine's batch, so
    both expansions grow the same trees (tokens, structure, finish reasons; log-probabilities to
    float tolerance: the batch's shape changes the kernels' rounding)."""
    tok = load_tokenizer(str(tiny_model_dir))
    eos = eos_token_ids(str(tiny_model_dir))
    cfg = TreeConfig(w=6, d=3, l=32, b=2, max_response_tokens=96, align_segments_to_blocks=True, seed=3)
    items = [(f"p{i}", p, {"answer": "0"}) for i, p in enumerate(prompts(tok))]
    grown, occupancy = {}, {}
    for expansion in ("level", "barrier_free"):
        sampling = SamplingConfig(per_request_seed=True, expansion=expansion)
        grown[expansion], occupancy[expansion] = grow(
            vllm_backend, cfg, sampling, items, eos, lambda ids: tok.decode(ids), 2
        )
    level, free = grown["level"], grown["barrier_free"]
    assert sorted(level) == sorted(free) == ["p0", "p1", "p2"]
    for tree_id, a in level.items():
        b = free[tree_id]
        assert [(x.node_id, x.finish_reason, x.length) for x in a.leaves] == [
            (x.node_id, x.finish_reason, x.length) for x in b.leaves
        ]
        assert [(s.node_id, s.parent_id, s.depth) for s in a.segments] == [
            (s.node_id, s.parent_id, s.depth) for s in b.segments
        ]
        for s1, s2 in zip(a.segments, b.segments):
            assert s1.token_ids.tolist() == s2.token_ids.tolist()
            np.testing.assert_allclose(s1.logprobs, s2.logprobs, atol=1e-3)
    assert occupancy["barrier_free"] > occupancy["level"]  # the third tree enters while others are deep
