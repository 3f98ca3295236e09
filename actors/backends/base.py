"""The generation-backend protocol the segment-tree sampler runs on.

A backend extends a batch of token prefixes by at most ``max_tokens`` new tokens each. Every request
is one path (``n=1``); children of one node are duplicate requests of the same prefix, so an engine
with automatic prefix caching serves the shared prefix from its cache. A backend returns, per
request, the sampled token ids, the behavior logprob of each sampled token (as configured by
``SamplingConfig.logprobs_mode``), the finish reason (``"stop"``: an EOS id was sampled and is the
last token; ``"length"``: ``max_tokens`` reached) and how many prompt tokens were served from the
prefix cache.

Two ways to drive a backend: ``generate`` (one batched call, the whole batch returns together: the
level-synchronous sampler) and the request stream (``add_request`` a request under an id of the
caller's, ``step_requests`` runs one engine step and returns the requests that finished in it: the
barrier-free sampler submits a child segment as soon as its tree may branch). A backend without an
engine step loop streams through :class:`BatchStream` (each step runs every queued request in one
``generate`` call).

This module imports no torch or vllm: the sampler and its tests depend only on these types.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class GenRequest:
    """Extend ``prompt_ids`` (prompt + response so far) by at most ``max_tokens`` tokens."""

    prompt_ids: Sequence[int]
    max_tokens: int
    seed: int | None = None  # per-request seed (None = the engine's own stream)


@dataclass
class GenResult:
    token_ids: list[int]
    logprobs: list[float]  # behavior logprob of each sampled token
    finish_reason: str  # "stop" | "length"
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache (0 when unknown)


def stop_ids(model_path: str, eos_ids: Sequence[int] | None) -> list[int]:
    """The token ids that end a request: ``eos_ids`` as given, or the model's own EOS ids."""
    if eos_ids is None:
        from common.models import eos_token_ids  # transformers: loaded by the backend anyway

        eos_ids = eos_token_ids(model_path)
    return [int(i) for i in eos_ids]


@dataclass
class BackendCounters:
    """Cumulative counters since the backend was created (sum reductions)."""

    calls: int = 0
    requests: int = 0
    prefill_tokens_computed: int = 0
    prefill_tokens_cached: int = 0
    decoded_tokens: int = 0
    engine_steps: int = 0  # engine forward passes (one decoded token per running request)
    engine_requests: int = 0  # requests in the engine summed over its steps (occupancy = this / steps)

    def add(self, results: Sequence[GenResult], *, calls: int = 1) -> None:
        self.calls += calls
        self.requests += len(results)
        for r in results:
            self.prefill_tokens_cached += r.num_cached_tokens
            self.prefill_tokens_computed += r.num_prompt_tokens - r.num_cached_tokens
            self.decoded_tokens += len(r.token_ids)

    def add_engine_step(self, running: int) -> None:
        """One engine step over ``running`` requests (running or waiting in the engine)."""
        self.engine_steps += 1
        self.engine_requests += int(running)

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@runtime_checkable
class GenerationBackend(Protocol):
    policy_version: int
    counters: BackendCounters

    @property
    def block_size(self) -> int:
        """KV-cache block size; the sampler aligns segment ends to it (1 = no alignment)."""
        ...

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """One batched call; results are in request order."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]], version: int) -> None:
        """Load new weights (HF checkpoint names) and set ``policy_version = version``."""
        ...

    def reset_prefix_cache(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class RequestStream(Protocol):
    """The request stream of a backend (see the module docstring)."""

    def add_request(self, request_id: str, request: GenRequest) -> None:
        """Queue ``request`` under ``request_id`` (unique among the unfinished ones)."""
        ...

    def step_requests(self) -> list[tuple[str, GenResult]]:
        """Run one engine step; the requests that finished in it, as ``(request_id, result)``."""
        ...

    @property
    def unfinished_requests(self) -> int:
        """Requests added and not yet returned by :meth:`step_requests`."""
        ...


class BatchStream:
    """:class:`RequestStream` over a backend's ``generate``: a step runs every queued request in one
    batched call (all of them finish in that step), which is level-synchronous expansion again. For
    backends with no engine step loop of their own (the transformers backend, test fakes)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self._queued: list[tuple[str, GenRequest]] = []

    def add_request(self, request_id: str, request: GenRequest) -> None:
        self._queued.append((str(request_id), request))

    def step_requests(self) -> list[tuple[str, GenResult]]:
        if not self._queued:
            return []
        batch, self._queued = self._queued, []
        results = self.backend.generate([r for _, r in batch])
        if len(results) != len(batch):
            raise RuntimeError(f"backend returned {len(results)} results for {len(batch)} requests")
        return [(rid, res) for (rid, _), res in zip(batch, results)]

    @property
    def unfinished_requests(self) -> int:
        return len(self._queued)


def request_stream(backend: Any) -> RequestStream:
    """``backend`` itself if it streams requests, else a :class:`BatchStream` over its ``generate``."""
    if callable(getattr(backend, "step_requests", None)) and callable(getattr(backend, "add_request", None)):
        return backend
    return BatchStream(backend)
