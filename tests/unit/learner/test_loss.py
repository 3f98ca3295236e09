"""The policy loss against an independently written formula, its regions and its IS variants."""

from __future__ import annotations

import math

import pytest
import torch

from common.metrics import reduce_metrics
from learner.loss import LossParams, entropy_from_logits, policy_loss

D = torch.float64  # exact comparisons; never change the global default dtype in a test


def reference_loss(logp, prox, beh, adv, mask, total, p: LossParams, ref=None):
    """Per-token Python loop over the written formula (no shared code with learner.loss)."""
    total_loss = 0.0
    B, T = logp.shape
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t] > 0]
        seq_log = sum(float(prox[b, t] - beh[b, t]) for t in valid)
        for t in valid:
            a = float(adv[b, t])
            r = torch.exp(logp[b, t] - prox[b, t])
            lo, hi = 1 - p.clip_low, 1 + p.clip_high
            term = torch.maximum(-a * r, -a * torch.clamp(r, lo, hi))
            if p.dual_clip and a < 0:
                term = torch.minimum(term, torch.tensor(-a * p.dual_clip))
            raw = math.exp(float(prox[b, t] - beh[b, t]))
            if p.is_correction == "token":
                w = min(raw, p.is_cap)
            elif p.is_correction == "sequence":
                w = min(math.exp(seq_log / len(valid)), p.is_cap)
            elif p.is_correction == "sequence_product":
                w = min(math.exp(seq_log), p.is_cap)
            elif p.is_correction == "mask":
                w = 1.0 if 1 / p.is_cap <= raw <= p.is_cap else 0.0
            else:
                w = 1.0
            term = w * term
            if p.kl_coef and ref is not None:
                d = ref[b, t] - logp[b, t]
                term = term + p.kl_coef * (torch.exp(d) - d - 1)
            total_loss = total_loss + term
    return total_loss / total


def make_batch(seed=0, B=3, T=7, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    prox = -torch.rand(B, T, generator=g, dtype=D) * 3
    logp = (prox + torch.randn(B, T, generator=g, dtype=D) * spread).requires_grad_(True)
    beh = prox + torch.randn(B, T, generator=g, dtype=D) * spread
    adv = torch.randn(B, 1, generator=g, dtype=D).expand(B, T).clone()
    mask = torch.ones(B, T, dtype=D)
    mask[0, :2] = 0
    mask[2, -3:] = 0
    ref = prox + torch.randn(B, T, generator=g, dtype=D) * 0.1
    return logp, prox, beh, adv, mask, ref


@pytest.mark.parametrize("variant", ["token", "sequence", "sequence_product", "mask", "none"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_loss_and_grad_match_formula(variant, kl_coef):
    logp, prox, beh, adv, mask, ref = make_batch(seed=1)
    p = LossParams(0.2, 0.28, 3.0, variant, 1.5, kl_coef)
    total = float(mask.sum()) + 5  # the normaliser is whatever the caller passes
    loss, _ = policy_loss(logp, prox, beh, adv, mask, total, p, ref_logprobs_B_T=ref)
    (g,) = torch.autograd.grad(loss, logp)
    logp2 = logp.detach().clone().requires_grad_(True)
    expected = reference_loss(logp2, prox, beh, adv, mask, total, p, ref)
    (g2,) = torch.autograd.grad(expected, logp2)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(g, g2)
    assert float(g[mask == 0].abs().sum()) == 0.0


def test_on_policy_reduces_to_plain_ppo_clip():
    logp, prox, _, adv, mask, _ = make_batch(seed=2)
    plain = LossParams(0.2, 0.28, 10.0, "none", 2.0)
    want, _ = policy_loss(logp, prox, prox, adv, mask, float(mask.sum()), plain)
    for variant in ("token", "sequence", "sequence_product", "mask"):
        got, m = policy_loss(
            logp, prox, prox, adv, mask, float(mask.sum()), LossParams(0.2, 0.28, 10.0, variant, 2.0)
        )
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
        assert m["learner/is_weight_mean"].value == pytest.approx(1.0)
        assert m["learner/mismatch_kl_k3"].value == pytest.approx(0.0, abs=1e-12)


def _single(ratio: float, adv: float, p: LossParams):
    prox = torch.tensor([[-1.0]], dtype=D)
    logp = (prox + math.log(ratio)).requires_grad_(True)
    loss, m = policy_loss(logp, prox, prox, torch.tensor([[adv]], dtype=D), torch.ones(1, 1, dtype=D), 1.0, p)
    (g,) = torch.autograd.grad(loss, logp)
    return float(loss.detach()), float(g), m


def test_clip_higher_regions():
    p = LossParams(0.2, 0.28, 0.0, "none")
    # positive advantage: 1.25 is inside the higher bound (gradient flows), 1.3 is clipped
    loss, g, m = _single(1.25, 1.0, p)
    assert g == pytest.approx(-1.25) and m["learner/clip_frac_high"].value == 0.0
    loss, g, m = _single(1.3, 1.0, p)
    assert g == 0.0 and loss == pytest.approx(-1.28) and m["learner/clip_frac_high"].value == 1.0
    # negative advantage: below 1 - eps_low is clipped
    loss, g, m = _single(0.7, -1.0, p)
    assert g == 0.0 and loss == pytest.approx(0.8) and m["learner/clip_frac_low"].value == 1.0
    loss, g, _ = _single(0.85, -1.0, p)
    assert g == pytest.approx(0.85)


def test_dual_clip_bounds_negative_advantages():
    p = LossParams(0.2, 0.28, 3.0, "none")
    loss, g, m = _single(5.0, -2.0, p)
    assert loss == pytest.approx(6.0) and g == 0.0 and m["learner/clip_frac_dual"].value == 1.0
    loss, g, m = _single(2.0, -2.0, p)  # below c: ordinary unclipped region
    assert loss == pytest.approx(4.0) and g == pytest.approx(4.0) and m["learner/clip_frac_dual"].value == 0.0
    # without dual clip the same token is unbounded
    loss, _, _ = _single(5.0, -2.0, LossParams(0.2, 0.28, 0.0, "none"))
    assert loss == pytest.approx(10.0)


def test_importance_weight_truncation_and_mask():
    prox = torch.tensor([[-1.0, -1.0, -1.0]], dtype=D)
    beh = prox - torch.tensor([[math.log(3.0), math.log(1.2), -math.log(4.0)]])  # raw w = 3, 1.2, 0.25
    logp = prox.clone().requires_grad_(True)
    adv, mask = torch.ones(1, 3, dtype=D), torch.ones(1, 3, dtype=D)
    _, m = policy_loss(logp, prox, beh, adv, mask, 3.0, LossParams(is_correction="token", is_cap=2.0))
    assert m["learner/is_weight_max"].value == pytest.approx(2.0)
    assert m["learner/is_weight_min"].value == pytest.approx(0.25)
    assert m["learner/is_truncated_frac"].value == pytest.approx(2 / 3)
    _, m = policy_loss(logp, prox, beh, adv, mask, 3.0, LossParams(is_correction="mask", is_cap=2.0))
    assert m["learner/is_weight_mean"].value == pytest.approx(1 / 3)  # only the 1.2 token kept
    _, m = policy_loss(logp, prox, beh, adv, mask, 3.0, LossParams(is_correction="sequence", is_cap=2.0))
    assert m["learner/is_weight_mean"].value == pytest.approx((3 * 1.2 * 0.25) ** (1 / 3))


def test_micro_batches_sum_to_the_big_batch():
    logp, prox, beh, adv, mask, _ = make_batch(seed=4, B=4)
    p = LossParams()
    total = float(mask.sum())
    whole, _ = policy_loss(logp, prox, beh, adv, mask, total, p)
    (g_whole,) = torch.autograd.grad(whole, logp)
    parts = [
        policy_loss(logp[s], prox[s], beh[s], adv[s], mask[s], total, p) for s in (slice(0, 1), slice(1, 4))
    ]
    (g_parts,) = torch.autograd.grad(parts[0][0] + parts[1][0], logp)
    torch.testing.assert_close(g_whole, g_parts)
    merged = reduce_metrics([parts[0][1], parts[1][1]])
    _, m_whole = policy_loss(logp, prox, beh, adv, mask, total, p)
    for key in ("learner/clip_frac_low", "learner/is_weight_mean", "learner/mismatch_kl_k3"):
        assert merged[key] == pytest.approx(m_whole[key].value)
    assert merged["learner/is_weight_max"] == pytest.approx(m_whole["learner/is_weight_max"].value)
    assert merged["learner/tokens"] == total


def test_entropy_and_staleness_metrics():
    logits = torch.zeros(1, 2, 4)
    ent = entropy_from_logits(logits)
    torch.testing.assert_close(ent, torch.full((1, 2), math.log(4)))
    logp = torch.full((1, 2), -1.0, requires_grad=True)
    stale = torch.tensor([[0.0, 2.0]])
    _, m = policy_loss(
        logp,
        logp.detach(),
        logp.detach(),
        torch.ones(1, 2),
        torch.ones(1, 2),
        2.0,
        LossParams(),
        None,
        ent,
        stale,
    )
    assert m["learner/entropy"].value == pytest.approx(math.log(4))
    assert m["staleness/token_mean"].value == 1.0 and m["staleness/token_max"].value == 2.0


@pytest.mark.parametrize("variant", ["token", "sequence", "sequence_product", "mask", "none"])
def test_masked_tokens_are_inert_whatever_they_hold(variant):
    """Masked targets (padding, a tool's observation tokens: behavior logprob a 0.0 placeholder) add
    nothing to the loss, its gradient or any metric, even when their per-token values are garbage
    (huge, positive, NaN, inf): the result is bit-identical to the same batch with sane values."""
    logp, prox, beh, adv, mask, ref = make_batch(seed=6)
    mask[1, 2:4] = 0  # an observation span in the middle of a row
    p = LossParams(0.2, 0.28, 3.0, variant, 1.5, 0.05)
    ent, stale = torch.rand(logp.shape, dtype=D), torch.ones(logp.shape, dtype=D)

    def run(logp_in, prox_in, beh_in, adv_in, ref_in, ent_in, stale_in):
        x = logp_in.detach().clone().requires_grad_(True)
        loss, m = policy_loss(x, prox_in, beh_in, adv_in, mask, 11.0, p, ref_in, ent_in, stale_in)
        (g,) = torch.autograd.grad(loss, x)
        return loss.detach(), g, {k: v.value for k, v in m.items()}

    want = run(logp, prox, beh, adv, ref, ent, stale)
    off = mask == 0
    garbage = [x.detach().clone() for x in (logp, prox, beh, adv, ref, ent, stale)]
    for i, x in enumerate(garbage):
        x[off] = torch.tensor([80.0, -1e4, math.nan, math.inf, 3.0, -math.inf, 7.0], dtype=D)[i]
    got = run(*garbage)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[2] == want[2]
    assert float(got[1][off].abs().sum()) == 0.0 and math.isfinite(float(got[0]))
    # ... and the loss is the formula over the unmasked tokens only
    expected = reference_loss(logp, prox, beh, adv, mask, 11.0, p, ref)
    assert float(want[0]) == pytest.approx(float(expected.detach()), rel=1e-10, abs=1e-12)
