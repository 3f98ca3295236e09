"""The generation-backend protocol the segment-tree sampler runs on.

A backend extends a batch of token prefixes by at most ``max_tokens`` new tokens each. Every request
is one path (``n=1``); children of one node are duplicate requests of the same prefix, so an engine
with automatic prefix caching serves the shared prefix from its cache. A backend returns, per
request, the sampled token ids, the behavior logprob of each sampled token (as configured by
``SamplingConfig.logprobs_mode``), the finish reason (``"stop"``: an EOS id was sampled and is the
last token; ``"length"``: ``max_tokens`` reached) and how many prompt tokens were served from the
prefix cache.

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

    def add(self, results: Sequence[GenResult]) -> None:
        self.calls += 1
        self.requests += len(results)
        for r in results:
            self.prefill_tokens_cached += r.num_cached_tokens
            self.prefill_tokens_computed += r.num_prompt_tokens - r.num_cached_tokens
            self.decoded_tokens += len(r.token_ids)

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
