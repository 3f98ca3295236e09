"""One weight-sync receiver rank per vLLM engine worker, on a MULTIPROCESS vLLM CPU engine (the engine
and its worker in processes of their own, as on GPU): the worker joins the test's gloo group as rank 1,
receives in a background thread while the engine keeps generating, and the staged update, once
applied, makes the engine's logprobs equal a transformers forward pass of the sent weights.

One engine for the module (~30 s start-up here). ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` is set only
while it starts; its processes are spawned (a fork would copy the in-process engine other tests keep
in this process).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

from common.errors import SyncError
from common.weight_sync import WeightSender

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOST = "127.0.0.1"
ATOL = 2e-3  # float32 engine vs float32 transformers forward on CPU (as in test_weight_sync.py)
CHANGED = 2e-2  # the perturbation moves some logprob by more than this


@pytest.fixture(scope="module")
def mp_backend(tiny_model_dir):
    pytest.importorskip("vllm")
    import vllm.envs as envs

    from actors.backends.vllm_backend import VLLMBackend
    from common.config import GeneratorConfig, SamplingConfig

    cached = getattr(envs, "_is_envs_cache_enabled", lambda: False)()
    envs.disable_envs_cache()  # an in-process engine of this session cached VLLM_ENABLE_V1_MULTIPROCESSING=0
    gen = GeneratorConfig(block_size=32, kv_cache_gib=0.25, max_num_batched_tokens=8192)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
            mp.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
            backend = VLLMBackend(
                str(tiny_model_dir), gen, SamplingConfig(), dtype="float32", seed=0, max_model_len=1024
            )
    finally:
        if cached:
            envs.enable_envs_cache()
    assert not backend.in_process and backend.receiver_ranks == 1
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """(original, perturbed) transformers models and a fixed token sequence."""
    from common.models import load_model, load_tokenizer

    original = load_model(str(tiny_model_dir), dtype="float32")
    perturbed = load_model(str(tiny_model_dir), dtype="float32")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.2 * p.std() * torch.randn(p.shape, generator=g))
    ids = load_tokenizer(str(tiny_model_dir))("12+7=19 3*4+5*6=42 8-3=5")["input_ids"]
    return original, perturbed, [int(t) for t in ids]


def ref_logprobs(model, ids: list[int]) -> np.ndarray:
    """log p(ids[i] | ids[:i]) for i >= 1 from a transformers forward pass."""
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float()[:-1], dim=-1)
    return lp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).numpy()


def engine_logprobs(backend, ids: list[int]) -> np.ndarray:
    """The engine's prompt logprobs of the same tokens."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    out = backend.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
    return np.array([out.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i > 0])


def connect(sender: WeightSender) -> None:
    th = threading.Thread(target=sender.connect)
    th.start()
    th.join(timeout=60)
    assert not th.is_alive()


def named(model) -> list[tuple[str, torch.Tensor]]:
    # the learner's names: tied lm_head.weight included (the reload takes what it knows)
    return [(n, p.detach()) for n, p in model.named_parameters(remove_duplicate=False)]


def test_worker_receives_while_the_engine_generates_then_matches_the_sender(mp_backend, models):
    from actors.backends.base import GenRequest

    original, perturbed, ids = models
    old_ref, new_ref = ref_logprobs(original, ids), ref_logprobs(perturbed, ids)
    assert np.abs(new_ref - old_ref).max() > CHANGED  # the test can fail
    np.testing.assert_allclose(engine_logprobs(mp_backend, ids), old_ref, atol=ATOL)

    sender = WeightSender(HOST, 0, world_size=2, backend="gloo", timeout_s=60, bucket_mb=0.5)
    try:
        assert mp_backend.sync_join(sender.info.to_dict(), 1, 60.0) == [1]
        t0 = time.perf_counter()
        mp_backend.sync_receive_start()
        assert time.perf_counter() - t0 < 5  # returns at once: nothing was sent yet
        connect(sender)  # the worker's thread has joined the group and waits for the header
        # the engine generates while the receive is started and not complete (nothing sent yet)
        res = mp_backend.generate([GenRequest(ids[:6], 24)])[0]
        assert len(res.token_ids) == 24 or res.finish_reason == "stop"
        (st,) = mp_backend.sync_poll()
        assert st["state"] == "receiving" and st["rank"] == 1
        np.testing.assert_allclose(engine_logprobs(mp_backend, ids), old_ref, atol=ATOL)

        stats = sender.send(named(perturbed), version=11)
        assert stats.buckets >= 2
        assert mp_backend.sync_receive_wait(timeout_s=60) == 11
        assert mp_backend.policy_version == 0  # staged, not applied yet
        np.testing.assert_allclose(engine_logprobs(mp_backend, ids), old_ref, atol=ATOL)
        mp_backend.apply_staged(11)
        assert mp_backend.policy_version == 11
        assert mp_backend.sync_poll()[0]["staged"] == []  # the staged buffers were dropped
        got = engine_logprobs(mp_backend, ids)
        np.testing.assert_allclose(got, new_ref, atol=ATOL)
        assert np.abs(got - old_ref).max() > CHANGED
        with pytest.raises(SyncError, match="no staged update of version 11"):
            mp_backend.apply_staged(11)
    finally:
        sender.close()


def test_generator_stages_in_the_workers_and_applies_at_the_boundary(
    mp_backend, models, tiny_model_dir, redis_server
):
    """The generator's per-worker path: it asks for one rank, receives into the workers, applies the
    staged update at its next boundary, and drops a re-sent copy of weights already applied. Sends the
    original weights back, so the engine ends as built."""
    from redis_fixture import unique_run

    from actors.generator import STAGED_IN_ENGINE, Generator
    from common.config import load_config

    original, _, ids = models
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "eval.every_steps=0", "sync.timeout_s=60"])
    gen = Generator(cfg, 0, redis_server.url, redis_server.password, unique_run("wrecv"), backend=mp_backend)
    sender = WeightSender(HOST, 0, world_size=1 + gen.sync_ranks(), backend="gloo", timeout_s=60)
    try:
        assert gen.sync_ranks() == 1
        gen.sync_join(sender.info.to_dict(), 1)

        def receive(step: int) -> dict:
            out: dict = {}
            th = threading.Thread(target=lambda: out.update(version=gen.sync_receive(step)))
            th.start()
            return {"thread": th, "out": out}

        r = receive(step=2)
        sender.send(named(original), version=12)
        r["thread"].join(timeout=60)
        assert r["out"] == {"version": 12}
        assert gen._pending[0] is STAGED_IN_ENGINE and gen._pending[1:] == (12, 2)
        assert mp_backend.policy_version != 12  # not before the boundary
        gen._apply_pending()  # the segment boundary
        assert mp_backend.policy_version == 12 and gen.weights_step == 2 and gen._pending is None
        np.testing.assert_allclose(engine_logprobs(mp_backend, ids), ref_logprobs(original, ids), atol=ATOL)

        r = receive(step=2)  # a re-sync of the same step (after a group rebuild): refused, dropped
        sender.send(named(original), version=12)
        r["thread"].join(timeout=60)
        assert r["out"] == {"version": 12} and gen._pending is None
        assert mp_backend.sync_poll()[0]["staged"] == []
    finally:
        sender.close()
        gen.queue.close()


def test_receive_whose_sender_never_sends_times_out_and_generation_goes_on(mp_backend, models):
    from actors.backends.base import GenRequest

    _, _, ids = models
    sender = WeightSender(HOST, 0, world_size=2, backend="gloo", timeout_s=2)
    try:
        mp_backend.sync_join(sender.info.to_dict(), 1, 2.0)
        mp_backend.sync_receive_start()
        connect(sender)
        t0 = time.perf_counter()
        with pytest.raises(
            SyncError, match=r"rank 1: .*timed out after 2 s at metadata.*sync\.timeout_s=2\b"
        ):
            mp_backend.sync_receive_wait(timeout_s=60)
        assert time.perf_counter() - t0 < 15
        assert mp_backend.sync_poll()[0]["state"] == "failed"
        res = mp_backend.generate([GenRequest(ids[:6], 16)])[0]
        assert len(res.token_ids) > 0 and np.isfinite(res.logprobs).all()
    finally:
        sender.close()
        mp_backend.sync_close()
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "1"  # the switch did not leak


def test_update_weights_through_bucket_files(mp_backend, models):
    """The caller's path (``sync.receiver=generator``) into a multiprocess engine: bucket files written
    one at a time, read back tensor by tensor in the worker."""
    original, perturbed, ids = models
    new_ref, old_ref = ref_logprobs(perturbed, ids), ref_logprobs(original, ids)
    total = sum(t.nbytes for _, t in named(perturbed))
    old_bucket = mp_backend.update_bucket_bytes
    mp_backend.update_bucket_bytes = total // 6  # several buckets (files)
    try:
        mp_backend.update_weights(named(perturbed), version=21)
        assert mp_backend.policy_version == 21
        got = engine_logprobs(mp_backend, ids)
        np.testing.assert_allclose(got, new_ref, atol=ATOL)
        assert np.abs(got - old_ref).max() > CHANGED
    finally:
        mp_backend.update_weights(named(original), version=0)
        mp_backend.update_bucket_bytes = old_bucket
    np.testing.assert_allclose(engine_logprobs(mp_backend, ids), old_ref, atol=ATOL)
