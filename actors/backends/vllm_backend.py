"""vLLM generation backend: automatic prefix caching, token ids in and out, one ``n=1`` request per path.

Engine settings follow ``../shared/PITFALLS.md``: ``skip_tokenizer_init=True`` with ``TokensPrompt``
(so EOS handling is ``stop_token_ids`` = every EOS id), ``logprobs=0`` with an explicit
``logprobs_mode``, KV-cache size in bytes on CPU (``gpu_memory_utilization`` would mean a share of
host RAM there), and a block size the sampler aligns segment ends to. ``RequestOutput.num_cached_tokens``
gives the prompt tokens served from the prefix cache.

Weight updates: plain ``model.load_weights`` fails after the CPU build repacks weights, so the
update runs inside the worker through a worker extension (:class:`TreepoWorkerExtension`) that calls
``reload_weights(weights_iterator=..., is_checkpoint_format=True)``. With the in-process engine
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) the tensors are handed over directly; with the multiprocess
engine ``collective_rpc`` cannot carry tensors, so they go through a temporary safetensors file (the
streaming weight sync replaces this path). vLLM does not drop cached KV after an update:
``generators.reset_prefix_cache_on_update`` decides.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

from actors.backends.base import BackendCounters, GenRequest, GenResult
from common.config import GeneratorConfig, SamplingConfig
from common.errors import ModelError

EXTENSION = "actors.backends.vllm_backend.TreepoWorkerExtension"


class TreepoWorkerExtension:
    """Mixed into vLLM's worker class; methods are called with ``llm.collective_rpc(name, args=...)``."""

    def treepo_reload_weights(self, weights: list[tuple[str, Any]]) -> int:
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        return len(weights)

    def treepo_reload_weights_from_file(self, path: str) -> int:
        from safetensors.torch import load_file

        weights = list(load_file(path).items())
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        return len(weights)


class VLLMBackend:
    """:class:`actors.backends.base.GenerationBackend` over ``vllm.LLM``."""

    def __init__(
        self,
        model_path: str,
        gen_cfg: GeneratorConfig,
        sampling_cfg: SamplingConfig,
        *,
        dtype: str = "float32",
        eos_ids: Sequence[int] | None = None,
        seed: int = 0,
        max_model_len: int | None = None,
        **llm_kwargs: Any,
    ) -> None:
        from vllm import LLM
        from vllm.platforms import current_platform

        self.gen_cfg = gen_cfg
        self.sampling = sampling_cfg
        if eos_ids is None:
            from common.models import eos_token_ids

            eos_ids = eos_token_ids(model_path)
        self.eos_ids = [int(i) for i in eos_ids]
        self.policy_version = 0
        self.counters = BackendCounters()
        self.on_cpu = current_platform.is_cpu()
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
        kwargs: dict[str, Any] = dict(
            model=model_path,
            skip_tokenizer_init=True,
            enable_prefix_caching=True,
            block_size=gen_cfg.block_size,
            enforce_eager=gen_cfg.enforce_eager,
            dtype=dtype,
            max_num_batched_tokens=gen_cfg.max_num_batched_tokens,
            seed=seed,
            logprobs_mode=sampling_cfg.logprobs_mode,
            worker_extension_cls=EXTENSION,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if self.on_cpu:
            kwargs["kv_cache_memory_bytes"] = int(gen_cfg.kv_cache_gib * (1 << 30))
        else:
            kwargs["gpu_memory_utilization"] = gen_cfg.gpu_memory_utilization
            kwargs["tensor_parallel_size"] = max(gen_cfg.gpus_per_engine, 1)
        kwargs.update(llm_kwargs)
        try:
            self.llm = LLM(**kwargs)
        except Exception as e:  # vLLM raises many types at start-up; name the model and the settings
            raise ModelError(
                f"vLLM could not start on {model_path!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "check generators.kv_cache_gib / block_size / max_num_batched_tokens, or use generators.backend=hf"
            ) from e
        self._block_size = int(self.llm.llm_engine.vllm_config.cache_config.block_size)

    @property
    def block_size(self) -> int:
        return self._block_size

    def _params(self, max_tokens: int, seed: int | None):
        from vllm import SamplingParams

        s = self.sampling
        return SamplingParams(
            n=1,
            max_tokens=max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else -1,
            logprobs=0,
            stop_token_ids=list(self.eos_ids),
            # an explicit empty EOS list means "never stop early" (benchmarks of the analytic case);
            # otherwise vLLM also adds generation_config's EOS ids to the stop ids
            ignore_eos=not self.eos_ids,
            seed=seed,
            detokenize=False,
        )

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        from vllm.inputs import TokensPrompt

        if not requests:
            return []
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in r.prompt_ids]) for r in requests]
        params = [self._params(r.max_tokens, r.seed) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for req, out in zip(requests, outputs):
            comp = out.outputs[0]
            toks = [int(t) for t in comp.token_ids]
            lps = [float(comp.logprobs[i][t].logprob) for i, t in enumerate(toks)]
            reason = "stop" if comp.finish_reason == "stop" else "length"
            results.append(GenResult(toks, lps, reason, len(req.prompt_ids), int(out.num_cached_tokens or 0)))
        self.counters.add(results)
        return results

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]], version: int) -> None:
        weights = [(name, t.detach().to("cpu").contiguous()) for name, t in named_tensors]
        if self.in_process:
            self.llm.collective_rpc("treepo_reload_weights", args=(weights,))
        else:  # collective_rpc pickles its arguments across processes: tensors cannot travel that way
            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory(prefix="treepo-weights-") as tmp:
                path = os.path.join(tmp, "model.safetensors")
                # clone: tied tensors (embed_tokens / lm_head) share storage, which save_file refuses
                save_file({name: t.clone() for name, t in weights}, path)
                self.llm.collective_rpc("treepo_reload_weights_from_file", args=(path,))
        if self.gen_cfg.reset_prefix_cache_on_update:
            self.reset_prefix_cache()
        self.policy_version = int(version)

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down. In-process engines share vLLM's process-global distributed state:
        closing one breaks any other in-process engine of the same process (one engine per process)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None) if engine is not None else None
            if callable(shutdown):
                shutdown()
            self.llm = None
