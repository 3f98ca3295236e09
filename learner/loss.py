"""The policy loss: token-mean PPO-clip with clip-higher and dual clip, decoupled for stale data.

Per response token ``t`` with advantage ``A``, learner logprob ``logp`` (with grad), proximal logprob
``prox`` (the learner's own logprob recomputed before this update, detached) and behavior logprob
``beh`` (what the sampler used, stored in the tree):

- ``r = exp(logp - prox)``; ``pg = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` (clip-higher:
  ``eps_high > eps_low`` leaves more room to raise unlikely tokens);
- dual clip (``c > 1``, negative advantages only): ``pg = min(pg, -A c)`` bounds the loss of a token
  whose ratio exploded;
- decoupled off-policy correction (ours, required for asynchronous training): ``pg`` is multiplied by a
  detached importance weight ``w`` between the proximal and the behavior policy:
  ``token``: ``w = min(exp(prox - beh), C)``;
  ``sequence``: ``w = min(exp(mean_t(prox - beh)), C)``, the GEOMETRIC mean over the sequence's tokens
  (a product over thousands of tokens over/underflows; ``sequence_product`` is offered to compare);
  ``mask``: ``w = 1`` if ``1/C <= exp(prox - beh) <= C`` else 0 (the token is dropped, but still counts
  in the normaliser so that dropping never inflates the remaining tokens);
  ``none``: ``w = 1`` (plain PPO against ``prox``).
  With ``beh == prox`` (on-policy) every variant gives ``w = 1``: the loss is plain PPO-clip.
- optional k3 KL to a frozen reference: ``+ beta (exp(ref - logp) - (ref - logp) - 1)``.

Valid tokens are those with ``mask > 0``: sampled response tokens. Padding and observation tokens (a
tool's result: not sampled, its behavior logprob a 0.0 placeholder) are inert: their logprob,
behavior, reference and advantage values are replaced before any arithmetic, so they add nothing --
not even a NaN -- to the loss, its gradient, the importance weights (also the per-sequence ones)
or any metric, whatever values they hold.

The loss is ``sum over valid tokens / total_tokens``, where ``total_tokens`` is the number of valid
tokens of the WHOLE mini-batch across micro-batches and ranks: accumulating micro-batches (and
averaging across data-parallel ranks, after multiplying by the world size) then gives exactly the
gradient of one big batch. The paper's release uses the same token-mean; it has no IS weight.

Metrics are returned as :class:`common.metrics.Metric`: ``mean`` values are token-weighted means over
this call's valid tokens (``weight`` = that count), ``max``/``min``/``sum`` combine as such
(:func:`common.metrics.reduce_metrics`).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch

from common.config import IsCorrection
from common.errors import ConfigError
from common.metrics import Metric

IS_VARIANTS = typing.get_args(IsCorrection)  # algo.is_correction's values, declared with the field


@dataclass(frozen=True)
class LossParams:
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float = 10.0  # 0 disables; else must be > 1
    is_correction: str = "token"
    is_cap: float = 2.0
    kl_coef: float = 0.0

    @classmethod
    def from_algo(cls, algo) -> LossParams:
        return cls(
            algo.clip_low, algo.clip_high, algo.dual_clip, algo.is_correction, algo.is_cap, algo.kl_coef
        )

    def check(self) -> None:
        if self.is_correction not in IS_VARIANTS:
            raise ConfigError(
                f"is_correction={self.is_correction!r} is not one of {IS_VARIANTS}: fix algo.is_correction"
            )
        if self.dual_clip and self.dual_clip <= 1.0:
            raise ConfigError(f"dual_clip={self.dual_clip} must be > 1 or 0: fix algo.dual_clip")
        if self.is_cap < 1.0:
            raise ConfigError(f"is_cap={self.is_cap} must be >= 1: fix algo.is_cap")


def importance_weights(
    prox_B_T: torch.Tensor, behavior_B_T: torch.Tensor, mask_B_T: torch.Tensor, variant: str, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached weights ``w`` [B, T] and the raw token ratios ``exp(prox - beh)`` (for metrics)."""
    log_ratio = (prox_B_T - behavior_B_T).detach() * mask_B_T
    raw = torch.exp(log_ratio)
    if variant == "token":
        w = raw.clamp(max=cap)
    elif variant in ("sequence", "sequence_product"):
        seq = log_ratio.sum(-1, keepdim=True)
        if variant == "sequence":
            seq = seq / mask_B_T.sum(-1, keepdim=True).clamp(min=1)
        w = torch.exp(seq).clamp(max=cap).expand_as(raw)
    elif variant == "mask":
        w = ((raw >= 1.0 / cap) & (raw <= cap)).to(raw.dtype)
    elif variant == "none":
        w = torch.ones_like(raw)
    else:
        raise ConfigError(f"is_correction={variant!r} is not one of {IS_VARIANTS}: fix algo.is_correction")
    return w * mask_B_T, raw


def policy_loss(
    logprobs_B_T: torch.Tensor,
    prox_logprobs_B_T: torch.Tensor,
    behavior_logprobs_B_T: torch.Tensor,
    advantages_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    total_tokens: float,
    params: LossParams,
    ref_logprobs_B_T: torch.Tensor | None = None,
    entropy_B_T: torch.Tensor | None = None,
    staleness_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Metric]]:
    """Loss contribution of one micro-batch (sum over its valid tokens / ``total_tokens``) and metrics."""
    mask = mask_B_T.to(logprobs_B_T.dtype)
    valid = mask > 0
    prox = torch.where(valid, prox_logprobs_B_T.detach(), 0.0)
    # masked tokens: logp = prox = behavior = reference, advantage 0 -> ratio 1, w 1, kl 0, no gradient
    logprobs_B_T = torch.where(valid, logprobs_B_T, prox)
    behavior_logprobs_B_T = torch.where(valid, behavior_logprobs_B_T, prox)
    if ref_logprobs_B_T is not None:
        ref_logprobs_B_T = torch.where(valid, ref_logprobs_B_T, prox)
    adv = torch.where(valid, advantages_B_T.detach(), 0.0)
    ratio = torch.exp(logprobs_B_T - prox)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - params.clip_low, 1.0 + params.clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    neg = adv < 0
    if params.dual_clip:
        pg = torch.where(neg, torch.minimum(pg, -adv * params.dual_clip), pg)
    w, raw_w = importance_weights(prox, behavior_logprobs_B_T, mask, params.is_correction, params.is_cap)
    token_loss = w * pg
    kl = None
    if params.kl_coef and ref_logprobs_B_T is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs_B_T (reference-policy logprobs of the same tokens)")
    if params.kl_coef:
        d = ref_logprobs_B_T.detach() - logprobs_B_T
        kl = torch.exp(d) - d - 1.0
        token_loss = token_loss + params.kl_coef * kl
    loss = (token_loss * mask).sum() / total_tokens

    with torch.no_grad():
        n = float(mask.sum())
        metrics: dict[str, Metric] = {"learner/tokens": Metric.sum(n)}
        if n == 0:
            return loss, metrics

        def mean(x: torch.Tensor) -> Metric:  # token-weighted, so micro-batches combine exactly
            return Metric.mean(float((torch.where(valid, x.float(), 0.0) * mask).sum()) / n, weight=n)

        metrics["learner/pg_loss"] = mean(pg)
        metrics["learner/clip_frac_low"] = mean(neg & (ratio < 1.0 - params.clip_low))
        metrics["learner/clip_frac_high"] = mean((adv > 0) & (ratio > 1.0 + params.clip_high))
        if params.dual_clip:
            metrics["learner/clip_frac_dual"] = mean(neg & (ratio > params.dual_clip))
        metrics["learner/ratio_mean"] = mean(ratio)
        metrics["learner/is_weight_mean"] = mean(w)
        metrics["learner/is_weight_max"] = Metric.max(float(w[valid].max()))
        metrics["learner/is_weight_min"] = Metric.min(float(w[valid].min()))
        metrics["learner/is_raw_max"] = Metric.max(float(raw_w[valid].max()))
        metrics["learner/is_truncated_frac"] = mean((raw_w > params.is_cap) | (raw_w < 1.0 / params.is_cap))
        # train/inference mismatch, estimated with samples from the behavior policy:
        # k1 = mean(beh - prox), k3 = mean(r - 1 - log r) with r = prox/beh (>= 0, lower variance)
        log_r = (prox - behavior_logprobs_B_T) * mask
        metrics["learner/mismatch_kl_k1"] = mean(-log_r)
        metrics["learner/mismatch_kl_k3"] = mean(torch.exp(log_r) - 1.0 - log_r)
        if kl is not None:
            metrics["learner/ref_kl_k3"] = mean(kl)
        if entropy_B_T is not None:
            metrics["learner/entropy"] = mean(entropy_B_T)
        if staleness_B_T is not None:
            metrics["staleness/token_mean"] = mean(staleness_B_T)
            metrics["staleness/token_max"] = Metric.max(float(staleness_B_T[valid].max()))
    return loss, metrics


def entropy_from_logits(logits_B_T_V: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of the categorical distribution given by logits (no grad needed)."""
    logp = torch.log_softmax(logits_B_T_V.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
