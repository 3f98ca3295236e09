"""Tree-packed and padding-free micro-batches equal the per-leaf padded path: logprobs, loss, every
metric and every parameter gradient, in float32 on CPU, over random trees (shapes, early-ending and
EOS-shortened leaves, leaves at internal nodes, siblings that start alike, repeated prompts)."""

from __future__ import annotations

import copy
import math
import typing

import numpy as np
import pytest
import torch

from common.config import AlgoConfig, LearnerConfig, ModelConfig, PackingMode
from common.errors import ConfigError
from common.tree import Leaf, Segment, Tree
from learner.batching import leaf_sequences
from learner.loss import LossParams
from learner.packed import prefix_links
from learner.packing import PACKERS, computed_tokens, make_packer
from learner.rank import LearnerRank

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
