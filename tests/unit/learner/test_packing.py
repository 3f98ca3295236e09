"""Tree-packed and padding-free micro-batches equal the per-leaf padded path: logprobs, loss, every
metric and every parameter gradient, in float32 on CPU, over random trees (shapes, early-ending and
EOS-shortened leaves, leaves at internal nodes, siblings that start alike, repeated prompts); and with
tool turns, every packing masks observation tokens exactly as a written-out padded reference does."""

from __future__ import annotations

import copy
import math
import typing
from collections import Counter

import numpy as np
import pytest
import torch

from common.config import AlgoConfig, LearnerConfig, ModelConfig, PackingMode
from common.errors import ConfigError
from common.tree import Leaf, Segment, Tree, decode_tree, encode_tree
from learner.batching import LeafSequence, leaf_sequences
from learner.loss import LossParams
from learner.packed import prefix_links
from learner.packing import PACKERS, computed_tokens, make_packer
from learner.rank import LearnerRank
from learner.synthetic import synthetic_trees

VOCAB = 40


def _segment_tokens(rng, siblings: list[Segment]) -> np.ndarray:
    toks = rng.integers(4, VOCAB, int(rng.integers(1, 7)))
    if siblings and rng.random() < 0.3:  # branches that sampled the same first tokens
        head = siblings[0].token_ids[: int(rng.integers(1, 3))]
        toks = np.concatenate([head, toks])
    return toks


def random_tree(rng, tid: str, prompt=None) -> Tree:
    """A random segment tree: 1-3 root branches, 1-3 children per node, paths ending at random
    depths (early EOS / fallback), sometimes a leaf at an internal node, per-segment versions."""
    prompt = rng.integers(4, VOCAB, int(rng.integers(2, 9))) if prompt is None else prompt
    segments: list[Segment] = []
    leaves: list[int] = []
    max_depth = int(rng.integers(1, 5))
    stack = [(0, 0)]
    while stack:
        node, depth = stack.pop()
        if depth == max_depth or (depth > 0 and rng.random() < 0.25):
            leaves.append(node)
            continue
        if depth > 0 and rng.random() < 0.15:
            leaves.append(node)  # a trajectory that ended here while others went on
        kids: list[Segment] = []
        for _ in range(int(rng.integers(1, 4))):
            toks = _segment_tokens(rng, kids)
            lps = -rng.uniform(0.05, 3.0, len(toks))
            seg = Segment(len(segments) + 1, node, depth + 1, toks, lps, int(rng.integers(0, 4)))
            segments.append(seg)
            kids.append(seg)
            stack.append((seg.node_id, depth + 1))
    tree = Tree(tid, tid, prompt, segments, [])
    for n in leaves:
        tree.leaves.append(Leaf(n, "eos", int(sum(len(s.token_ids) for s in tree.path(n)))))
    for lf in tree.leaves:
        lf.reward = 0.0
    tree.validate()
    return tree


def random_batches(seed: int = 0, batches: int = 6, per_batch: int = 4):
    rng = np.random.default_rng(seed)
    out = []
    for b in range(batches):
        trees = [random_tree(rng, f"t{b}-{i}") for i in range(per_batch)]
        trees.append(random_tree(rng, f"t{b}-dup", prompt=trees[0].prompt_ids))  # a repeated prompt
        adv = [rng.normal(size=len(t.leaves)) for t in trees]
        out.append((trees, adv))
    return out


@pytest.fixture(scope="module")
def ranks(tiny_model_dir):
    """One rank per packing, same weights; the packed ones with small budgets (several micro-batches,
    trees cut into leaf chunks, sequences longer than the budget)."""
    algo = AlgoConfig(kl_coef=0.05, dual_clip=3.0)
    out = {}
    for name, packing, attention, budget in (
        ("none", "none", "auto", 4096),
        ("tree", "tree", "runs", 48),
        ("tree-mask", "tree", "mask", 4096),
        ("flat", "flat", "runs", 40),
    ):
        cfg = LearnerConfig(micro_batch_tokens=budget, packing=packing, packed_attention=attention)
        out[name] = LearnerRank(ModelConfig(path=str(tiny_model_dir)), algo, cfg, temperature=0.7)
    return out


def _grads(rank) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in rank.module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", ["token", "sequence", "mask"])
def test_packed_equals_padded(ranks, variant):
    """>= 20 random trees per variant: packed logprobs, loss, metrics and gradients equal the padded."""
    params = LossParams(clip_low=0.2, clip_high=0.28, dual_clip=3.0, is_correction=variant, kl_coef=0.05)
    rng = np.random.default_rng(7)
    n_trees = 0
    for trees, adv in random_batches(seed={"token": 0, "sequence": 1, "mask": 2}[variant]):
        n_trees += len(trees)
        base = leaf_sequences(trees, adv)
        noise = [rng.normal(scale=0.4, size=s.response_len).astype(np.float32) for s in base]
        results = {}
        for name, rank in ranks.items():
            rank.loss_params = params
            seqs = copy.deepcopy(base)
            rank.prepare(seqs)
            prox = [s.prox_logprobs_R.copy() for s in seqs]
            for s, e in zip(seqs, noise):  # off-policy: ratios away from 1, so every clip branch is hit
                s.prox_logprobs_R = s.prox_logprobs_R + e
            metrics = rank.forward_backward(seqs)
            results[name] = (prox, [s.ref_logprobs_R for s in seqs], rank._loss_sum, metrics, _grads(rank))
            rank.optimizer.zero_grad(set_to_none=True)
            rank._reset_accumulators()
        _assert_same(results, base)
    assert n_trees >= 20


def _assert_same(results, seqs) -> None:
    prox0, ref0, loss0, metrics0, grads0 = results["none"]
    assert metrics0["learner/clip_frac_low"] > 0 and metrics0["learner/clip_frac_high"] > 0
    for name, (prox, ref, loss, metrics, grads) in results.items():
        for a, b, s in zip(prox0, prox, seqs):
            assert len(b) == s.response_len
            np.testing.assert_allclose(b, a, rtol=0, atol=2e-5, err_msg=name)
        for a, b in zip(ref0, ref):
            np.testing.assert_allclose(b, a, rtol=0, atol=2e-5, err_msg=name)
        assert math.isclose(loss, loss0, rel_tol=1e-5, abs_tol=1e-6), (name, loss, loss0)
        assert set(metrics) == set(metrics0), name
        for key, value in metrics0.items():
            if key == "learner/forward_tokens":
                continue
            assert math.isclose(metrics[key], value, rel_tol=1e-4, abs_tol=1e-5), (name, key)
        assert set(grads) == set(grads0)
        for key, g0 in grads0.items():
            scale = float(g0.abs().max()) + 1e-8
            assert float((grads[key] - g0).abs().max()) <= 1e-4 * scale + 1e-7, (name, key)
    padded, tree, flat = (results[k][3]["learner/forward_tokens"] for k in ("none", "tree-mask", "flat"))
    lengths = [len(s.token_ids) for s in seqs]
    assert flat == sum(lengths) < padded  # padding-free: every real token once, no padding
    assert tree == computed_tokens(seqs, "tree") < flat  # one micro-batch: shared prefixes once
    assert results["tree"][3]["learner/forward_tokens"] < flat  # small budget: trees cut, still shared


def test_prefix_links_and_layout():
    """Sequences of one prompt share their longest common prefix with an earlier one; other prompts
    share nothing; the packed row's mask lets a token see exactly its own path."""
    rng = np.random.default_rng(3)
    tree = random_tree(rng, "a")
    other = random_tree(rng, "b")
    seqs = leaf_sequences([tree, other], [np.zeros(len(tree.leaves)), np.zeros(len(other.leaves))])
    lcp, parent = prefix_links(seqs)
    for i, s in enumerate(seqs):
        if parent[i] >= 0:
            p = seqs[parent[i]]
            assert np.array_equal(s.token_ids[: lcp[i]], p.token_ids[: lcp[i]])
            assert s.token_ids[: s.prompt_len].tobytes() == p.token_ids[: p.prompt_len].tobytes()
            assert lcp[i] >= s.prompt_len
    batch = make_packer("tree").collate(seqs)
    ids = batch["input_ids"][0].numpy()
    mask = batch["layout"].dense_mask().numpy()
    pos = batch["position_ids"][0].numpy()
    for q in range(len(ids)):
        seen = np.flatnonzero(mask[q])
        assert list(pos[seen]) == list(range(pos[q] + 1))  # one token per position up to its own
    flat = make_packer("flat").collate(seqs)
    assert flat["input_ids"].shape[1] == sum(len(s.token_ids) for s in seqs)


def test_plan_respects_the_budget():
    rng = np.random.default_rng(5)
    trees = [random_tree(rng, f"t{i}") for i in range(8)]
    seqs = leaf_sequences(trees, [np.zeros(len(t.leaves)) for t in trees])
    for packing in ("tree", "flat"):
        for budget in (16, 40, 200):
            groups = make_packer(packing).plan(seqs, budget)
            assert sorted(i for g in groups for i in g) == list(range(len(seqs)))
            for g in groups:
                cost = computed_tokens([seqs[i] for i in g], packing)
                assert cost <= budget or len(g) == 1 or packing == "tree"
                if packing == "tree" and cost > budget:  # only a single over-long leaf chunk
                    assert len({seqs[i].token_ids[: seqs[i].prompt_len].tobytes() for i in g}) == 1


def test_bad_packing_is_refused(tiny_model_dir):
    cfg = LearnerConfig(packing="rows")
    with pytest.raises(ConfigError, match="learner.packing"):
        LearnerRank(ModelConfig(path=str(tiny_model_dir)), AlgoConfig(), cfg)


def test_every_allowed_packing_has_one_packer():
    """The registry's modes are exactly the allowed values of learner.packing, and each makes its own."""
    assert set(PACKERS) == set(typing.get_args(PackingMode))
    for mode in PACKERS:
        assert make_packer(mode).mode == mode


# ---------------------------------------------------------------------------------- observation tokens
def observed_tree(rng, tid: str, prompt=None) -> Tree:
    """:func:`random_tree` with tool turns: a segment's tail marked as observation tokens (logprob 0.0)
    or a whole non-root segment made of them (a tool result as its own segment)."""
    tree = random_tree(rng, tid, prompt)
    depth_one = {s.node_id for s in tree.segments if s.parent_id == 0}
    for s in tree.segments:
        n, obs = len(s.token_ids), np.zeros(len(s.token_ids), dtype=bool)
        if s.parent_id not in depth_one and s.parent_id != 0 and rng.random() < 0.15:
            obs[:] = True  # its parent has a sampled token (parents are not made whole observations)
        elif n >= 2 and rng.random() < 0.5:
            obs[n - int(rng.integers(1, n)) :] = True
        if obs.any():
            s.observed, s.logprobs = obs, np.where(obs, 0.0, s.logprobs).astype(np.float32)
            depth_one.add(s.node_id)  # children of a whole-observation segment keep their samples
    tree.validate()
    return tree


def _observation_batches(seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for b in range(3):
        trees = [observed_tree(rng, f"o{b}-{i}") for i in range(4)]
        trees.append(observed_tree(rng, f"o{b}-dup", prompt=trees[0].prompt_ids))
        out.append((trees, [rng.normal(size=len(t.leaves)) for t in trees]))
    return out


def _observed_R(tree: Tree, leaf: Leaf) -> np.ndarray:
    """Which response tokens of ``leaf`` are observations, read straight off its path's segments."""
    return np.concatenate(
        [
            np.zeros(len(s.token_ids), bool) if s.observed is None else s.observed
            for s in tree.path(leaf.node_id)
        ]
    )


def _reference(module, trees, seqs, params: LossParams, temperature: float):
    """The loss and gradients written out: one padded row per leaf through a copy of the model, the
    PPO-clip / dual-clip / token-IS / k3-KL formula per token, each observation token's loss weight
    explicitly 0 and the normaliser the count of the others."""
    module.zero_grad(set_to_none=True)
    weights = [1.0 - _observed_R(t, lf) for t in trees for lf in t.leaves if lf.length]
    total = float(sum(w.sum() for w in weights))
    loss = torch.zeros((), dtype=torch.float32)
    logps = []
    for s, w in zip(seqs, weights, strict=True):
        ids = torch.from_numpy(s.token_ids).unsqueeze(0)
        logits = module(input_ids=ids, use_cache=False).logits[0, :-1].float() / temperature
        logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[s.prompt_len - 1 :, 0]
        logps.append(logp.detach().numpy())
        prox, beh, ref = (
            torch.from_numpy(x) for x in (s.prox_logprobs_R, s.behavior_logprobs_R, s.ref_logprobs_R)
        )
        a, r = s.advantage, torch.exp(logp - prox)
        term = torch.maximum(-a * r, -a * r.clamp(1 - params.clip_low, 1 + params.clip_high))
        if a < 0:
            term = torch.minimum(term, torch.full_like(term, -a * params.dual_clip))
        term = term * torch.exp(prox - beh).clamp(max=params.is_cap)
        d = ref - logp
        term = term + params.kl_coef * (torch.exp(d) - d - 1)
        on = torch.from_numpy(w > 0)
        loss = loss + (torch.from_numpy(w)[on].float() * term[on]).sum()
    loss = loss / total
    loss.backward()
    return float(loss.detach()), _grads_of(module), logps, total


def _grads_of(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _step(rank, seqs):
    metrics = rank.forward_backward(seqs)
    out = (rank._loss_sum, metrics, _grads(rank))
    rank.optimizer.zero_grad(set_to_none=True)
    rank._reset_accumulators()
    return out


@pytest.mark.parametrize("name", ["none", "tree", "tree-mask", "flat"])
def test_observation_tokens_are_masked_in_every_packing(ranks, name):
    """Trees with tool turns (observation spans in shared prefixes, in single leaves, whole observation
    segments): the packing's loss and gradients equal the written-out padded reference in which those
    tokens weigh 0; and garbage at observation tokens (behavior, π_prox, reference logprobs) changes
    neither the loss nor any gradient by a single bit."""
    rank = ranks[name]
    params = LossParams(clip_low=0.2, clip_high=0.28, dual_clip=3.0, is_correction="token", kl_coef=0.05)
    rank.loss_params = params
    reference = copy.deepcopy(ranks["none"].module)
    rng = np.random.default_rng(11)
    shared = single = 0
    for trees, adv in _observation_batches(seed=5):
        for t in trees:
            below = {s.node_id: sum(s.node_id in p for p in t.leaf_paths()) for s in t.segments}
            shared += sum(s.num_observed for s in t.segments if below[s.node_id] > 1)
            single += sum(s.num_observed for s in t.segments if below[s.node_id] == 1)
        seqs = leaf_sequences(trees, adv)
        rank.prepare(seqs)
        for s in seqs:  # off-policy: ratios away from 1, so the clip branches are hit
            s.prox_logprobs_R = s.prox_logprobs_R + rng.normal(scale=0.4, size=s.response_len).astype(
                np.float32
            )
        loss, metrics, grads = _step(rank, seqs)
        want, want_grads, logps, total = _reference(reference, trees, seqs, params, rank.temperature)
        assert metrics["learner/tokens"] == total == rank.global_token_count(seqs)
        assert total < sum(s.response_len for s in seqs)
        assert math.isclose(loss, want, rel_tol=1e-5, abs_tol=1e-6), (loss, want)
        assert set(grads) == set(want_grads)
        for key, g0 in want_grads.items():
            scale = float(g0.abs().max()) + 1e-8
            assert float((grads[key] - g0).abs().max()) <= 1e-4 * scale + 1e-7, key
        fresh = rank.compute_logprobs(seqs)  # the packing's logprobs: the model's, 0.0 on observations
        for s, lp, got in zip(seqs, logps, fresh):
            on = s.loss_weights_R > 0
            np.testing.assert_allclose(got[on], lp[on], rtol=0, atol=2e-5)
            assert not got[~on].any()
        garbled = copy.deepcopy(seqs)
        for s in garbled:
            off = s.loss_weights_R == 0
            s.behavior_logprobs_R[off] = 5.0
            s.prox_logprobs_R[off] = rng.choice([-100.0, 50.0, 3.0], size=int(off.sum()))  # exp overflows
            s.ref_logprobs_R[off] = -80.0
        g_loss, g_metrics, g_grads = _step(rank, garbled)
        assert g_loss == loss and g_metrics == metrics
        assert all(torch.equal(g_grads[k], grads[k]) for k in grads)
    assert shared > 0 and single > 0


def test_synthetic_trees_with_tool_turns_reach_the_loss_masks():
    """``synthetic_trees(tool_prob=...)``: observation spans in shared segments and in single leaves,
    valid on the wire; each leaf sequence's loss mask is 0 exactly on its path's observation tokens."""
    trees = synthetic_trees(6, w=4, depth=3, seg_len=4, tool_prob=0.4, tool_len=3, seed=2)
    assert synthetic_trees(2, seed=2)[0].num_observation_tokens() == 0  # off by default
    seqs = leaf_sequences(trees, [np.ones(len(t.leaves)) for t in trees])
    kinds = set()
    for t in trees:
        assert decode_tree(encode_tree(t)).num_observation_tokens() == t.num_observation_tokens()
        below = Counter(n for p in t.leaf_paths() for n in p)
        kinds |= {below[s.node_id] > 1 for s in t.segments if s.num_observed}
        assert t.num_tokens() == sum(len(s.token_ids) for s in t.segments) - t.num_observation_tokens()
    assert kinds == {True, False}
    masks = [1.0 - _observed_R(t, lf) for t in trees for lf in t.leaves]
    assert len(masks) == len(seqs)
    for s, m in zip(seqs, masks):
        np.testing.assert_array_equal(s.loss_weights_R, m)
        assert (s.loss_mask_R is None) == bool(m.all())  # no observation: no mask, as before
        assert s.loss_tokens == int(m.sum()) and not s.behavior_logprobs_R[m == 0].any()
    bad = LeafSequence(np.arange(5), 2, np.zeros(3), np.zeros(3, np.int64), 0.0, loss_mask_R=np.ones(2))
    with pytest.raises(ValueError, match="loss_mask_R has shape"):
        bad.loss_tokens  # noqa: B018 - the property checks
    assert LeafSequence(np.arange(5), 2, np.zeros(3), np.zeros(3, np.int64), 0.0).loss_tokens == 3
