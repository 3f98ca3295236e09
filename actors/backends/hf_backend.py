"""Transformers generation backend: the reference and fallback (no prefix cache, no segment alignment).

A batched sampling loop with a KV cache over a left-padded batch (position ids from the attention
mask, so padding does not shift positions). Token processing follows vLLM's order: temperature,
then top-k, then top-p (keep the smallest set whose mass reaches ``top_p``, at least one token),
sample from the renormalised distribution. ``processed_logprobs`` is the log-probability under that
distribution; ``raw_logprobs`` the model's own ``log_softmax`` before any processing. Requests are
processed in chunks of ``max_batch`` rows to bound memory. A request ends at a stop token or, with
``stop_strings``, at the token that completes one in its output.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from actors.backends.base import BackendCounters, GenRequest, GenResult, stop_ids
from common.config import GeneratorConfig, SamplingConfig
from common.errors import ModelError


class HFBackend:
    """:class:`actors.backends.base.GenerationBackend` over a transformers causal LM."""

    def __init__(
        self,
        model_path: str,
        gen_cfg: GeneratorConfig,
        sampling_cfg: SamplingConfig,
        *,
        dtype: str = "float32",
        eos_ids: Sequence[int] | None = None,
        seed: int = 0,
        device: str = "cpu",
        max_batch: int = 64,
        model: Any = None,
        stop_strings: Sequence[str] = (),
    ) -> None:
        import torch

        from common.models import load_model

        self.gen_cfg = gen_cfg
        self.sampling = sampling_cfg
        self.eos_ids = stop_ids(model_path, eos_ids)
        self.stop = None  # stop strings (generators.stop): a request ends at the token completing one
        if stop_strings:
            from common.models import load_tokenizer
            from common.stops import StopRule

            tok = load_tokenizer(model_path)
            self.stop = StopRule.of((), stop_strings)
            self._decode = lambda ids: tok.decode(list(ids), skip_special_tokens=True)
        self.model = model if model is not None else load_model(model_path, dtype=dtype, device=device)
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.policy_version = 0
        self.counters = BackendCounters()
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        pad = getattr(self.model.config, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)

    @property
    def block_size(self) -> int:
        return 1  # no prefix cache: nothing to align to

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        results: list[GenResult] = []
        for i in range(0, len(requests), self.max_batch):
            results.extend(self._generate_chunk(requests[i : i + self.max_batch]))
        self.counters.add(results)
        return results

    def _process(self, logits):
        """(processed logits for sampling, logprobs reported) for one step, float32 [B, V]."""
        import torch

        s = self.sampling
        raw = torch.log_softmax(logits, dim=-1)
        x = logits / s.temperature
        if s.top_k > 0 and s.top_k < x.shape[-1]:
            kth = torch.topk(x, s.top_k, dim=-1).values[:, -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if s.top_p < 1.0:
            sorted_x, idx = torch.sort(x, dim=-1, descending=False)
            cum = torch.softmax(sorted_x, dim=-1).cumsum(dim=-1)
            drop = cum <= 1.0 - s.top_p
            drop[:, -1] = False  # keep at least the most likely token
            x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
        processed = torch.log_softmax(x, dim=-1)
        return processed, (processed if s.logprobs_mode == "processed_logprobs" else raw)

    def _generate_chunk(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        import torch

        B = len(requests)
        lens = [len(r.prompt_ids) for r in requests]
        P = max(lens)
        ids = torch.full((B, P), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((B, P), dtype=torch.long, device=self.device)
        for b, r in enumerate(requests):
            ids[b, P - lens[b] :] = torch.as_tensor(list(r.prompt_ids), dtype=torch.long)
            mask[b, P - lens[b] :] = 1
        gens = [
            torch.Generator(device=self.device).manual_seed(int(r.seed)) if r.seed is not None else None
            for r in requests
        ]
        max_new = [int(r.max_tokens) for r in requests]
        out_toks: list[list[int]] = [[] for _ in range(B)]
        out_lps: list[list[float]] = [[] for _ in range(B)]
        done = [m <= 0 for m in max_new]
        stopped = [False] * B
        eos = set(self.eos_ids)
        past = None
        cur_ids, cur_pos = ids, (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            for _ in range(max(max_new)):
                if all(done):
                    break
                self.counters.add_engine_step(sum(1 for x in done if not x))
                out = self.model(
                    input_ids=cur_ids,
                    attention_mask=mask,
                    position_ids=cur_pos,
                    past_key_values=past,
                    use_cache=True,
                )
                past = out.past_key_values
                logits = out.logits[:, -1, :].float()
                processed, report = self._process(logits)
                probs = processed.exp()
                nxt = torch.empty(B, dtype=torch.long, device=self.device)
                shared = [b for b in range(B) if gens[b] is None]
                if shared:
                    nxt[shared] = torch.multinomial(probs[shared], 1, generator=self.generator).squeeze(-1)
                for b in range(B):
                    if gens[b] is not None:
                        nxt[b] = torch.multinomial(probs[b : b + 1], 1, generator=gens[b]).squeeze(-1)
                lp = report.gather(-1, nxt[:, None]).squeeze(-1)
                for b in range(B):
                    if done[b]:
                        continue
                    t = int(nxt[b])
                    out_toks[b].append(t)
                    out_lps[b].append(float(lp[b]))
                    if t in eos or self._stop_string_ends(out_toks[b]):
                        done[b] = stopped[b] = True
                    elif len(out_toks[b]) >= max_new[b]:
                        done[b] = True
                cur_ids = nxt[:, None]
                cur_pos = cur_pos[:, -1:] + 1
                mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=self.device)], dim=-1)
        return [
            GenResult(out_toks[b], out_lps[b], "stop" if stopped[b] else "length", lens[b], 0)
            for b in range(B)
        ]

    def _stop_string_ends(self, toks: list[int]) -> bool:
        """Whether the newest token completes a stop string (within this request's output: one split
        across requests is the sampler's to find)."""
        if self.stop is None:
            return False
        tail = toks[-(self.stop.context_tokens + 1) :]
        return self.stop.string_end(tail[:-1], tail[-1:], self._decode) is not None

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]], version: int) -> None:
        state = {name: t.detach() for name, t in named_tensors}
        result = self.model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ModelError(
                f"weight update has {len(result.unexpected_keys)} names the model does not know "
                f"(e.g. {result.unexpected_keys[0]!r}): send Hugging Face checkpoint names"
            )
        self.policy_version = int(version)

    def reset_prefix_cache(self) -> None:
        pass  # no prefix cache

    def close(self) -> None:
        self.model = None
