"""Integration fixtures: ONE in-process vLLM CPU engine per test session, shared by every test.

The engine runs the random-init "xs" tiny model (``tiny_model_dir``) in float32 with prefix caching,
``block_size=32`` and a small KV cache. A test that changes the engine's weights or sampling settings
must restore them (see :func:`restored`), so later tests see the model as built.
"""

from __future__ import annotations

import contextlib
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: ~3 s start-up

ENGINE_BLOCK_SIZE = 32


@pytest.fixture(scope="session")
def vllm_backend(tiny_model_dir):
    """A :class:`actors.backends.vllm_backend.VLLMBackend` on the xs tiny model (session-scoped)."""
    pytest.importorskip("vllm")
    from actors.backends.vllm_backend import VLLMBackend
    from common.config import GeneratorConfig, SamplingConfig

    gen = GeneratorConfig(block_size=ENGINE_BLOCK_SIZE, kv_cache_gib=0.25, max_num_batched_tokens=8192)
    backend = VLLMBackend(
        str(tiny_model_dir), gen, SamplingConfig(), dtype="float32", seed=0, max_model_len=1024
    )
    yield backend
    backend.close()


@contextlib.contextmanager
def restored(backend, sampling=None):
    """Temporarily use ``sampling`` on a shared backend; restores its sampling config and version."""
    old_sampling, old_version = backend.sampling, backend.policy_version
    if sampling is not None:
        backend.sampling = sampling
    try:
        yield backend
    finally:
        backend.sampling = old_sampling
        backend.policy_version = old_version


from redis_fixture import redis_server  # noqa: E402,F401  (one embedded redis-server per session)


@pytest.fixture
def server(redis_server):  # noqa: F811
    """The session's shared Redis under its short name (queue, dead-letter and secret tests)."""
    return redis_server
