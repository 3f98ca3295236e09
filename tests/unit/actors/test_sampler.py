"""Segment-tree sampler rules over a deterministic, scriptable fake backend (the sampler is pure logic).

Vocabulary of the fake: token id = character code for printable ASCII; ids 0 and 1 are EOS (they
decode to nothing). By default the fake emits random lowercase letters (no EOS, no repetition, no
boxed answer); a ``script(prefix, resp_len, max_tokens, rng)`` may return the tokens to emit instead.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.backends.base import BackendCounters, GenRequest, GenResult
from actors.sampler import (
    TreeSampler,
    allocate_fixed_avg,
    allocate_prob,
    analytic_decoded_tokens,
    child_budget,
    cosine_tau,
    has_repetition,
    prob_weights,
    segment_tokens,
)
from common.answers import last_boxed
from common.config import SamplingConfig, TreeConfig
from common.sampling_metrics import FALLBACKS_KEY, RESTARTS_KEY, tree_metrics
from common.tree import ROOT_ID, decode_tree, encode_tree

EOS_IDS = (0, 1)
PROMPT = [ord(c) for c in "Q: 2+3=?"]


def text(s: str) -> list[int]:
    return [ord(c) for c in s]


def decode(ids) -> str:
    return "".join(chr(t) for t in ids if t >= 32)


class FakeBackend:
    """Deterministic backend; records every batch and every (prefix -> output) it produced."""

    def __init__(self, script=None, block_size=1, seed=0, extra_tokens=0, logprob_fn=None):
        self.script = script
        self._block_size = block_size
        self.rng = np.random.default_rng(seed)
        self.extra_tokens = extra_tokens  # return more tokens than asked (tests truncation)
        self.logprob_fn = logprob_fn
        self.policy_version = 0
        self.counters = BackendCounters()
        self.batches: list[list[GenRequest]] = []
        self.outputs: dict[tuple, list[list[int]]] = {}
        self.prompt_len = len(PROMPT)

    @property
    def block_size(self):
        return self._block_size

    def generate(self, requests):
        self.batches.append(list(requests))
        out = []
        for req in requests:
            prefix = list(req.prompt_ids)
            n = req.max_tokens + self.extra_tokens
            toks = None
            rng = self._rng_for(req)
            if self.script is not None:
                toks = self.script(prefix, len(prefix) - self.prompt_len, n, rng)
            if toks is None:
                toks = [int(t) for t in rng.integers(97, 123, size=n)]
            toks = toks[:n]
            lps = [self.logprob_fn(prefix, t) if self.logprob_fn else -0.5 for t in toks]
            self.outputs.setdefault(tuple(prefix), []).append(toks)
            reason = "stop" if toks and toks[-1] in EOS_IDS else "length"
            out.append(GenResult(toks, lps, reason, len(prefix), 0))
        self.counters.add(out)
        return out

    def _rng_for(self, req):
        return self.rng  # one stream for every request, in call order

    def update_weights(self, named_tensors, version):
        self.policy_version = version

    def reset_prefix_cache(self):
        pass

    def close(self):
        pass


def cfg(**kw) -> TreeConfig:
    base = dict(w=8, d=4, l=8, b=2, max_response_tokens=32, align_segments_to_blocks=False)
    base.update(kw)
    return TreeConfig(**base)


def sample_one(tree_cfg, backend, prompt=PROMPT, sampling=None, eos_ids=EOS_IDS):
    sampler = TreeSampler(backend, tree_cfg, sampling, eos_ids, decode)
    trees = list(sampler.run([("p0", prompt)], max_in_flight=1))
    assert len(trees) == 1
    return trees[0], sampler


def leaf_by_reason(tree):
    return Counter(lf.finish_reason for lf in tree.leaves)


# --------------------------------------------------------------------------------------------------
# Pure rule functions
# --------------------------------------------------------------------------------------------------


def test_find_boxed_and_repetition():
    assert last_boxed(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{1} then \boxed{2") == "1"  # last COMPLETE one
    assert last_boxed("no answer") is None
    assert has_repetition("ab" * 40, 32, 8)
    assert not has_repetition("".join(chr(97 + (i * 7) % 26) + str(i) for i in range(40)), 32, 8)
    assert not has_repetition("ab" * 15, 32, 8)  # shorter than the window


def test_segment_alignment_rule():
    # (path length - 1) must be a multiple of the block size after the segment; first one stretched < 1 block
    assert segment_tokens(65, 0, 32, 1000, 32, True) == 32
    first = segment_tokens(70, 0, 32, 1000, 32, True)
    assert 32 <= first < 64 and (70 + first - 1) % 32 == 0
    assert segment_tokens(70 + first, first, 32, 1000, 32, True) == 32
    assert segment_tokens(70, 0, 32, 1000, 32, False) == 32
    assert segment_tokens(70, 990, 32, 1000, 32, True) == 10  # never past Lmax


def test_budget_transfer_formula():
    assert child_budget(a=3, f=1, F=1, w=8, b=2) == 7  # 3 survivors get the finished path's 2 children
    assert child_budget(a=3, f=0, F=0, w=8, b=2) == 6
    assert child_budget(a=5, f=0, F=3, w=8, b=2) == 5  # every live path keeps >= 1 child
    assert child_budget(a=2, f=2, F=4, w=8, b=2) == 4  # capped by w - F


def test_fixed_avg_remainder_last_vs_random():
    rng = np.random.default_rng(0)
    assert allocate_fixed_avg(7, 3, "last", rng) == [2, 2, 3]
    assert allocate_fixed_avg(8, 3, "last", rng) == [2, 2, 4]  # the release's lopsided remainder
    got = [tuple(allocate_fixed_avg(8, 3, "random", np.random.default_rng(s))) for s in range(40)]
    assert all(sum(c) == 8 and sorted(c) == [2, 3, 3] for c in got)
    assert len(set(got)) == 3  # the extra children land on different paths


def test_probability_allocation_hand_made_logprobs():
    scores = [-1.0, -2.0, -3.0]
    w_low = prob_weights(scores, sigma=-1.0, tau=2.0)
    z = np.array([-1.0, -0.5, 0.0])
    np.testing.assert_allclose(w_low, np.exp(z) / np.exp(z).sum())
    # quotas 5*w = [0.93, 1.54, 2.53]: floors [0,1,2], 2 more by largest remainder -> paths 0 and 1
    assert allocate_prob(8, w_low) == [2, 3, 3]
    assert allocate_prob(8, prob_weights(scores, sigma=1.0, tau=2.0)) == [3, 3, 2]
    assert allocate_prob(3, w_low) == [1, 1, 1]  # one child each first
    # a higher temperature flattens the allocation
    assert allocate_prob(20, prob_weights(scores, -1.0, 100.0)) in ([7, 7, 6], [7, 6, 7], [6, 7, 7])
    assert cosine_tau(5.0, 1.0, 1, 5) == pytest.approx(5.0)
    assert cosine_tau(5.0, 1.0, 5, 5) == pytest.approx(1.0)
    assert cosine_tau(5.0, 1.0, 3, 5) == pytest.approx(3.0)


def test_probability_allocation_in_the_sampler_favours_low_probability_paths():
    # root paths are all 'a' (likely: logprob -0.1) or all 'b' (unlikely: -3.0)
    def script(prefix, resp_len, n, rng):
        return [97 if rng.random() < 0.5 else 98] * n if resp_len == 0 else None

    def logprob_fn(prefix, tok):
        return -0.1 if tok == 97 else -3.0

    checked = 0
    for allocation, favoured in (("prob_low", 98), ("prob_high", 97)):
        for seed in range(6):
            fake = FakeBackend(script, seed=seed, logprob_fn=logprob_fn)
            c = cfg(w=16, d=2, b=4, root_divergence_min=4, root_divergence_max=4, allocation=allocation)
            tree, _ = sample_one(c, fake)
            roots = [s for s in tree.segments if s.depth == 1]
            n_kind = Counter(int(s.token_ids[0]) for s in roots)
            if set(n_kind) != {97, 98}:
                continue
            checked += 1
            children = Counter(
                int(tree.nodes()[s.parent_id].token_ids[0]) for s in tree.segments if s.depth == 2
            )
            per_path = {k: children[k] / n_kind[k] for k in n_kind}
            other = 97 if favoured == 98 else 98
            assert per_path[favoured] > per_path[other]
            assert sum(children.values()) == 16 and min(children.values()) >= 1
    assert checked >= 4


def test_analytic_bound_matches_the_paper_formula():
    # equal segments, no alignment: 1 - sum_k min(2^k, w) / (w d)
    tree, flat = analytic_decoded_tokens(16, 14, 512, 2, 2, 14 * 512, 100, 1, False)
    assert 1 - tree / flat == pytest.approx(1 - sum(min(2**k, 16) for k in range(1, 15)) / (16 * 14))
    assert 1 - tree / flat == pytest.approx(0.152, abs=0.002)
    tree, flat = analytic_decoded_tokens(16, 7, 1024, 2, 2, 7 * 1024, 100, 1, False)
    assert 1 - tree / flat == pytest.approx(0.304, abs=0.002)  # (2+4+8+16*4)/(16*7)


# --------------------------------------------------------------------------------------------------
# Invariants over random shapes and seeds
# --------------------------------------------------------------------------------------------------


def random_script(p_eos, p_boxed, p_rep):
    def script(prefix, resp_len, n, rng):
        u = rng.random()
        if u < p_eos:
            k = int(rng.integers(0, n))
            return [int(t) for t in rng.integers(97, 123, size=k)] + [int(rng.choice(EOS_IDS))]
        if u < p_eos + p_boxed:
            return (text(r"\boxed{5}") + [0])[:n] if n >= 10 else None
        if u < p_eos + p_boxed + p_rep:
            return text("xy" * n)[:n]
        return None

    return script


shapes = st.fixed_dictionaries(
    {
        "w": st.integers(1, 16),
        "d": st.integers(1, 6),
        "l": st.integers(1, 12),
        "b": st.integers(1, 4),
        "rd": st.tuples(st.integers(1, 8), st.integers(0, 4)),
        "block": st.sampled_from([1, 4]),
        "align": st.booleans(),
        "allocation": st.sampled_from(["fixed_avg", "prob_low", "prob_high"]),
        "remainder": st.sampled_from(["random", "last"]),
        "fallback": st.sampled_from(["answered_or_eos", "any", "answered", "none"]),
        "answer_policy": st.sampled_from(["boxed_and_eos_first", "boxed_as_eos"]),
        "lmax_frac": st.floats(0.3, 1.0),
        "p": st.tuples(st.floats(0, 0.5), st.floats(0, 0.3), st.floats(0, 0.2)),
        "seed": st.integers(0, 2**16),
        "mode": st.sampled_from(["tree", "tree", "tree", "flat"]),
        "trees": st.integers(1, 4),
    }
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes)
def test_invariants_over_random_shapes(s):
    w = s["w"]
    l = s["l"] * (s["block"] if s["align"] else 1)
    rmin = min(s["rd"][0], w)
    rmax = min(rmin + s["rd"][1], w)
    lmax = max(1, int(s["d"] * l * s["lmax_frac"]))
    c = TreeConfig(
        mode=s["mode"],
        w=w,
        d=s["d"],
        l=l,
        b=s["b"],
        root_divergence_min=rmin,
        root_divergence_max=rmax,
        max_response_tokens=lmax,
        allocation=s["allocation"],
        remainder=s["remainder"],
        fallback=s["fallback"],
        answer_policy=s["answer_policy"],
        align_segments_to_blocks=s["align"],
        seed=s["seed"],
        repetition_substring_chars=4,
        repetition_min_count=3,
    )
    fake = FakeBackend(random_script(*s["p"]), block_size=s["block"], seed=s["seed"])
    sampler = TreeSampler(fake, c, SamplingConfig(), EOS_IDS, decode)
    prompts = [(f"p{i}", PROMPT + [97 + i] * i) for i in range(s["trees"])]
    for pid, ids in prompts:
        sampler.submit(pid, ids, {"answer": "5"})
    trees = []
    calls = 0
    while sampler.in_flight:
        trees += sampler.step()
        calls += 1
        assert len(fake.batches) == calls  # one backend call per step
        for state in sampler._trees.values():
            assert len(state.pending) + len(state.leaves) <= w  # a + F <= w
    assert sorted(t.prompt_id for t in trees) == [p for p, _ in prompts]
    for tree in trees:
        check_tree(tree, c, fake)


def check_tree(tree, c, fake):
    tree.validate()
    again = decode_tree(encode_tree(tree))
    assert [lf.node_id for lf in again.leaves] == [lf.node_id for lf in tree.leaves]
    assert len(tree.leaves) == c.w  # exactly w leaves
    nodes = tree.nodes()
    parents = {s.parent_id for s in tree.segments}
    bs = fake.block_size
    P = len(tree.prompt_ids)
    d = 1 if c.mode == "flat" else c.d
    ends = {}
    for s in sorted(tree.segments, key=lambda s: s.node_id):
        assert s.depth <= d
        start = 0 if s.parent_id == ROOT_ID else ends[s.parent_id]
        ends[s.node_id] = start + len(s.token_ids)
        assert ends[s.node_id] <= c.max_response_tokens
        # what the engine produced for exactly this prefix
        prefix = tuple(tree.prompt_ids.tolist()) + tuple(
            np.concatenate([x.token_ids for x in tree.path(s.parent_id)] or [np.zeros(0, np.int32)]).tolist()
            if s.parent_id != ROOT_ID
            else ()
        )
        produced = fake.outputs[prefix]
        assert any(list(o[: len(s.token_ids)]) == s.token_ids.tolist() for o in produced)
        if s.node_id in parents:
            # an inner node is a WHOLE segment (fallback cuts land on segment boundaries)
            full = segment_tokens(
                P + start, start, c.l, c.max_response_tokens, bs, c.align_segments_to_blocks
            )
            assert len(s.token_ids) == full
            if c.align_segments_to_blocks and bs > 1 and c.l % bs == 0:
                assert (P + ends[s.node_id] - 1) % bs == 0
    for leaf in tree.leaves:
        assert leaf.node_id not in parents
        resp = tree.response_ids(leaf)
        assert len(resp) == leaf.length == ends[leaf.node_id]
        np.testing.assert_array_equal(
            resp, np.concatenate([nodes[n].token_ids for n in tree.leaf_paths()[tree.leaves.index(leaf)]])
        )
        if leaf.finish_reason == "eos":
            assert resp[-1] in EOS_IDS
        if leaf.finish_reason == "max_tokens":
            assert leaf.length == c.max_response_tokens


# --------------------------------------------------------------------------------------------------
# Classification rules
# --------------------------------------------------------------------------------------------------


def at_depth(depth, l, tokens_fn):
    """Script: emit tokens_fn(n) for the segment starting at response offset (depth-1)*l."""

    def script(prefix, resp_len, n, rng):
        return tokens_fn(n) if resp_len == (depth - 1) * l else None

    return script


def test_eos_as_first_token_of_a_segment():
    fake = FakeBackend(at_depth(2, 8, lambda n: [0] + [97] * (n - 1)))
    tree, _ = sample_one(cfg(w=4, d=3, l=8, max_response_tokens=24), fake)
    eos = [lf for lf in tree.leaves if lf.finish_reason == "eos"]
    assert eos and all(lf.length == 9 for lf in eos)  # 8 tokens + the EOS, the rest dropped
    assert all(tree.nodes()[lf.node_id].depth == 2 for lf in eos)


def test_any_id_of_an_eos_list_ends_a_path():
    fake = FakeBackend(at_depth(1, 8, lambda n: [98, 98, 1, 98, 98][:n]))
    tree, _ = sample_one(cfg(w=2, d=3, b=1, fallback="none", max_response_tokens=24), fake)
    first = [s for s in tree.segments if s.depth == 1 and s.node_id in {lf.node_id for lf in tree.leaves}]
    assert first and all(s.token_ids.tolist() == [98, 98, 1] for s in first)
    # with only id 0 as EOS, id 1 is an ordinary token
    tree, _ = sample_one(
        cfg(w=2, d=3, b=1, fallback="none", max_response_tokens=24),
        FakeBackend(at_depth(1, 8, lambda n: [98, 98, 1] + [98] * (n - 3))),
        eos_ids=(0,),
    )
    assert "eos" not in leaf_by_reason(tree)


def test_boxed_answer_split_across_two_segments():
    seg1 = text(r"ok \boxed{4")  # 11 tokens
    seg2 = text("2}.")

    def make_script(with_eos):
        def script(prefix, resp_len, n, rng):
            if resp_len == 0:
                return seg1[:n]
            if resp_len == len(seg1):
                return seg2 + ([0] if with_eos else [98] * (n - 3))
            return None

        return script

    # the release only searches the last segment ("2}.") and would miss this answer
    for with_eos, policy, expected in (
        (True, "boxed_and_eos_first", "finished"),
        (False, "boxed_as_eos", "finished"),
        (False, "boxed_and_eos_first", None),
        (True, "boxed_as_eos", "finished"),
    ):
        tree, _ = sample_one(
            cfg(w=2, d=4, l=11, b=1, answer_policy=policy, max_response_tokens=44, fallback="none"),
            FakeBackend(make_script(with_eos)),
        )
        depth2 = {s.node_id for s in tree.segments if s.depth == 2}
        reasons = {lf.finish_reason for lf in tree.leaves if lf.node_id in depth2}
        if expected:
            assert reasons == {expected}
        else:
            assert not reasons  # no answer without EOS under the release's policy: the path goes on


def test_the_answer_window_is_the_last_segment_plus_an_overlap():
    # a box followed by 300 characters inside one long segment ends the path (a 200-character tail
    # missed it); a box that sits wholly before the overlap does not end a later segment's path
    box_then_text = text(r"so \boxed{5}") + text("x y " * 75)  # 12 + 300 tokens

    def script(prefix, resp_len, n, rng):
        return box_then_text[:n] if resp_len == 0 else None

    c = cfg(w=1, d=2, l=320, b=1, answer_policy="boxed_as_eos", max_response_tokens=640, fallback="none")
    c = dataclasses.replace(c, root_divergence_min=1, root_divergence_max=1, repetition_check=False)
    tree, _ = sample_one(c, FakeBackend(script))
    assert [lf.finish_reason for lf in tree.leaves] == ["finished"] and tree.leaves[0].length == 312

    early_box = text(r"\boxed{5}") + text("z" * 10)  # the box ends 10 tokens before the boundary

    def script2(prefix, resp_len, n, rng):
        if resp_len == 0:
            return early_box
        return [int(t) for t in rng.integers(97, 123, size=n - 1)] + [0]

    c2 = cfg(w=1, d=2, l=20, b=1, max_response_tokens=40, fallback="none", repetition_check=False)
    c2 = dataclasses.replace(c2, root_divergence_min=1, root_divergence_max=1)
    for overlap, reason in ((30, "finished"), (5, "eos")):
        tree, _ = sample_one(dataclasses.replace(c2, answer_overlap_tokens=overlap), FakeBackend(script2))
        assert [lf.finish_reason for lf in tree.leaves] == [reason], overlap


def test_repetition_and_its_priority_option():
    rep = lambda n: text("ab" * n)[: n - 1] + [0]  # noqa: E731 - repetitive AND ends with EOS
    c = cfg(w=2, d=2, l=80, b=1, max_response_tokens=160, fallback="none")
    tree, _ = sample_one(c, FakeBackend(at_depth(1, 80, rep)))
    assert set(leaf_by_reason(tree)) == {"eos"}  # EOS comes first by default
    tree, _ = sample_one(dataclasses.replace(c, repetition_first=True), FakeBackend(at_depth(1, 80, rep)))
    assert set(leaf_by_reason(tree)) == {"repetition"}
    tree, _ = sample_one(c, FakeBackend(at_depth(1, 80, lambda n: text("ab" * n)[:n])))
    assert set(leaf_by_reason(tree)) == {"repetition"}
    tree, _ = sample_one(
        dataclasses.replace(c, repetition_check=False),
        FakeBackend(at_depth(1, 80, lambda n: text("ab" * n)[:n])),
    )
    assert "repetition" not in leaf_by_reason(tree)


def test_max_tokens_truncation_and_max_depth():
    # the backend returns 5 more tokens than asked: the path is truncated to Lmax
    fake = FakeBackend(extra_tokens=5)
    tree, _ = sample_one(cfg(w=4, d=3, l=8, max_response_tokens=20), fake)
    assert leaf_by_reason(tree) == {"max_tokens": 4}
    assert all(lf.length == 20 for lf in tree.leaves)
    assert [r.max_tokens for r in fake.batches[2]] == [4] * 4  # the last request asks only up to Lmax
    # Lmax beyond d*l (not a valid config, but the rule must hold): depth ends the path
    tree, _ = sample_one(cfg(w=4, d=3, l=8, max_response_tokens=100), FakeBackend())
    assert leaf_by_reason(tree) == {"max_depth": 4}


# --------------------------------------------------------------------------------------------------
# Branching, budget, root divergence, fallback
# --------------------------------------------------------------------------------------------------


def test_branch_schedule_2_4_8_16_without_early_stops():
    fake = FakeBackend()
    tree, sampler = sample_one(cfg(w=16, d=6, l=4, b=2, max_response_tokens=24), fake)
    assert [len(b) for b in fake.batches] == [2, 4, 8, 16, 16, 16]
    assert leaf_by_reason(tree) == {"max_tokens": 16}
    assert sampler.stats.decoded_tokens == 4 * (2 + 4 + 8 + 16 + 16 + 16)
    tree_tokens, flat_tokens = analytic_decoded_tokens(16, 6, 4, 2, 2, 24, len(PROMPT), 1, False)
    assert sampler.stats.decoded_tokens == tree_tokens and flat_tokens == 16 * 24


def test_budget_transfer_in_the_sampler():
    calls = {"n": 0}

    def script(prefix, resp_len, n, rng):
        if resp_len == 8:  # second segment: the first request of the batch ends with EOS
            calls["n"] += 1
            if calls["n"] == 1:
                return [98] * (n - 1) + [0]
        return None

    fake = FakeBackend(script)
    sample_one(cfg(w=8, d=4, l=8, b=2, max_response_tokens=32), fake)
    # step 3: a=3 survivors, f=1, F=1: T = max(3, min(7, 2*3 + 2*1)) = 7 (6 without the transfer)
    assert [len(b) for b in fake.batches[:3]] == [2, 4, 7]


def test_root_divergence_draw_takes_effect():
    c = cfg(w=16, d=2, l=4, max_response_tokens=8, root_divergence_min=2, root_divergence_max=8)
    fake = FakeBackend()
    sampler = TreeSampler(fake, c, None, EOS_IDS, decode)
    sizes = []
    for i in range(60):
        sampler.submit(f"p{i}", PROMPT)
        sizes.append(len(sampler._trees[f"p{i}"].pending))
    assert set(sizes) == set(range(2, 9))
    capped = TreeSampler(
        FakeBackend(), cfg(w=4, root_divergence_min=2, root_divergence_max=8), None, EOS_IDS, decode
    )
    capped.submit("x", PROMPT)
    assert len(capped._trees["x"].pending) <= 4
    flat = TreeSampler(FakeBackend(), cfg(mode="flat", w=5), None, EOS_IDS, decode)
    flat.submit("x", PROMPT)
    assert len(flat._trees["x"].pending) == 5


def run_until_fallback(c, script, seed):
    fake = FakeBackend(script, seed=seed)
    sampler = TreeSampler(fake, c, None, EOS_IDS, decode)
    sampler.submit("p", PROMPT)
    state = sampler._trees["p"]
    while state.fallbacks == 0:
        assert not sampler.step(), "the tree finished without a fallback"
    return state


@pytest.mark.parametrize(
    "policy,ending,expect_cut",
    [
        ("answered_or_eos", "eos", True),
        ("answered_or_eos", "finished", True),
        ("answered_or_eos", "repetition", False),
        ("answered", "finished", True),
        ("answered", "eos", False),
        ("any", "max_tokens", True),
        ("any", "repetition", True),
        ("none", "finished", False),
    ],
)
def test_fallback_candidate_policies(policy, ending, expect_cut):
    l, d = 12, 3
    endings = {
        "eos": lambda n: [98] * (n - 1) + [0],
        "finished": lambda n: (text(r"\boxed{5}") + [0] + [98] * n)[:n],
        "repetition": lambda n: text("xy" * n)[:n],
        "max_tokens": lambda n: None,
    }
    script = at_depth(d if ending == "max_tokens" else 2, l, endings[ending])
    c = cfg(
        w=8,
        d=d,
        l=l,
        b=1,
        max_response_tokens=d * l,
        fallback=policy,
        repetition_substring_chars=4,
        repetition_min_count=3,
    )
    cut_parents = set()
    for seed in range(8):
        state = run_until_fallback(dataclasses.replace(c, seed=seed), script, seed)
        assert {lf.finish_reason for lf in state.leaves} == {ending}
        assert len(state.pending) == (c.w - len(state.leaves) if expect_cut else 2)
        leaf_paths = [state.path_ids(lf.node_id) for lf in state.leaves]
        for p in state.pending:
            assert p.node_id not in state.nodes  # a new node: a sibling inside the original subtree
            if p.parent_id != ROOT_ID:
                # the kept part is whole segments of a candidate's path, never the leaf itself
                assert any(p.parent_id in path[:-1] for path in leaf_paths)
                assert p.depth == state.nodes[p.parent_id].depth + 1
            cut_parents.add(p.parent_id)
    if expect_cut:
        assert cut_parents - {ROOT_ID}, "no cut kept any segment over 8 seeds"
    else:
        assert cut_parents == {ROOT_ID}  # restart from the root


def test_fallback_trees_finish_with_exactly_w_leaves():
    script = at_depth(2, 8, lambda n: [98] * (n - 1) + [0])
    for seed in range(10):
        tree, sampler = sample_one(
            cfg(w=8, d=3, l=8, b=1, max_response_tokens=24, seed=seed), FakeBackend(script, seed=seed)
        )
        assert len(tree.leaves) == 8 and sampler.stats.fallbacks >= 1
        tree.validate()
        # the counts travel on the tree (the replay queue's consumer reports them)
        assert tree.metadata[FALLBACKS_KEY] >= 1 and tree.metadata[RESTARTS_KEY] == 0
        assert tree_metrics([tree])["tree/fallbacks"] == tree.metadata[FALLBACKS_KEY]


def test_a_fallback_without_candidates_is_counted_as_a_restart():
    script = at_depth(2, 8, lambda n: [98] * (n - 1) + [0])  # every path ends in EOS at depth 2
    tree, sampler = sample_one(
        cfg(w=8, d=3, l=8, b=1, max_response_tokens=24, fallback="none"), FakeBackend(script, seed=0)
    )
    m = sampler.stats.as_dict()
    assert len(tree.leaves) == 8 and m["tree/restarts"] >= 1
    assert m["tree/restarts"] == m["tree/fallbacks"] == tree.metadata[RESTARTS_KEY]


# --------------------------------------------------------------------------------------------------
# Determinism, many trees in flight, versions, metrics
# --------------------------------------------------------------------------------------------------


def test_determinism_given_a_seed():
    def sample(seed, fake_seed):
        c = cfg(
            w=8,
            d=4,
            l=6,
            b=2,
            max_response_tokens=24,
            root_divergence_min=1,
            root_divergence_max=5,
            seed=seed,
        )
        fake = FakeBackend(random_script(0.2, 0.05, 0.05), seed=fake_seed)
        sampler = TreeSampler(fake, c, None, EOS_IDS, decode)
        out = list(sampler.run([(f"p{i}", PROMPT) for i in range(4)], max_in_flight=3))
        for t in out:
            t.timings.clear()
        return [encode_tree(t) for t in out]

    assert sample(1, 7) == sample(1, 7)
    assert sample(1, 7) != sample(2, 7)  # the sampler's own choices depend on its seed


def test_per_request_seeds_are_distinct_and_deterministic():
    fake = FakeBackend()
    sample_one(
        cfg(w=8, d=3, l=4, max_response_tokens=12), fake, sampling=SamplingConfig(per_request_seed=True)
    )
    seeds = [r.seed for b in fake.batches for r in b]
    assert None not in seeds and len(set(seeds)) == len(seeds)
    fake2 = FakeBackend()
    sample_one(
        cfg(w=8, d=3, l=4, max_response_tokens=12), fake2, sampling=SamplingConfig(per_request_seed=True)
    )
    assert seeds == [r.seed for b in fake2.batches for r in b]
    fake3 = FakeBackend()
    sample_one(cfg(w=8, d=3, l=4, max_response_tokens=12), fake3)
    assert all(r.seed is None for b in fake3.batches for r in b)


def test_many_trees_in_flight_one_call_per_step_and_early_admission():
    quick = PROMPT + [120]  # prompts ending in 'x' answer with EOS at once

    def script(prefix, resp_len, n, rng):
        return [0] if prefix[len(PROMPT)] == 120 and resp_len == 0 else None

    fake = FakeBackend(script)
    fake.prompt_len = len(PROMPT) + 1
    c = cfg(w=4, d=4, l=4, b=2, max_response_tokens=16, fallback="none")
    sampler = TreeSampler(fake, c, None, EOS_IDS, decode)
    prompts = [
        ("slow", PROMPT + [121]),
        ("fast", quick),
        ("next1", PROMPT + [122]),
        ("next2", PROMPT + [123]),
    ]
    done = []
    for tree in sampler.run(prompts, max_in_flight=2):
        done.append((tree.prompt_id, len(fake.batches)))
    order = [p for p, _ in done]
    assert order.index("fast") < order.index("slow")
    # 'next1' entered as soon as 'fast' left, while 'slow' was still growing: one call mixes both
    trees_per_call = [{int(r.prompt_ids[len(PROMPT)]) for r in batch} for batch in fake.batches]
    first_next1 = next(i for i, t in enumerate(trees_per_call) if 122 in t)
    assert first_next1 == dict(done)["fast"] and 121 in trees_per_call[first_next1]
    assert sampler.stats.steps == len(fake.batches)
    assert sampler.stats.trees == 4 and sampler.stats.leaves == 16


@pytest.mark.parametrize("expansion", ["level", "barrier_free"])
def test_segments_record_the_policy_version(expansion):
    fake = FakeStreamBackend() if expansion == "barrier_free" else FakeBackend()
    c = cfg(w=4, d=3, l=4, max_response_tokens=12)
    sampler = TreeSampler(fake, c, SamplingConfig(expansion=expansion), EOS_IDS, decode)
    sampler.submit("p", PROMPT)
    trees = sampler.step()
    # barrier-free: depth 2 is in the engine already; it finishes under the weights it started with
    trees += sampler.drain()
    assert sampler.requests_in_engine == 0
    fake.update_weights([], version=3)  # an update between two steps (a segment boundary)
    while sampler.in_flight:
        trees += sampler.step()
    versions = {s.depth: s.version for s in trees[0].segments}
    old = 4 if expansion == "level" else 8  # response tokens sampled under version 0
    assert versions[1] == 0 and versions[2] == (0 if expansion == "barrier_free" else 3) and versions[3] == 3
    leaf = trees[0].leaves[0]
    assert trees[0].response_versions(leaf).tolist() == [0] * old + [3] * (12 - old)


def test_barrier_free_refuses_an_update_with_segments_in_the_engine():
    fake = FakeStreamBackend()
    sampler = TreeSampler(fake, cfg(w=4, d=3, l=4, max_response_tokens=12), None, EOS_IDS, decode)
    sampler.submit("p", PROMPT)
    sampler.step()
    assert sampler.requests_in_engine > 0
    fake.update_weights([], version=1)  # without drain(): the in-flight segments would mix versions
    with pytest.raises(RuntimeError, match="drain"):
        while sampler.in_flight:
            sampler.step()


def test_metrics_are_namespaced_and_consistent():
    fake = FakeBackend(random_script(0.3, 0.0, 0.0), seed=3)
    _, sampler = sample_one(cfg(w=8, d=4, l=4, max_response_tokens=16), fake)
    m = sampler.stats.metrics(wall_s=2.0)
    assert all(k.startswith(("rollout/", "tree/")) for k in m)
    assert m["rollout/decoded_tokens"].value == fake.counters.decoded_tokens
    assert m["tree/leaves"].value == 8 and m["tree/leaves_per_tree"].reduce == "mean"
    assert sum(v.value for k, v in m.items() if k.startswith("tree/finish/")) == 8
    assert sum(v.value for k, v in m.items() if k.startswith("tree/leaf_depth/")) == 8
    assert m["rollout/trajectories_per_s"].value == pytest.approx(4.0)


def test_backend_factory_rejects_an_unknown_kind():
    from actors.backends import make_backend
    from common.config import GeneratorConfig
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="generators.backend"):
        make_backend("tgi", "/nonexistent", GeneratorConfig(), SamplingConfig())


# --------------------------------------------------------------------------------------------------
# Barrier-free expansion: the same trees as the level-synchronous reference
# --------------------------------------------------------------------------------------------------


class FakeStreamBackend(FakeBackend):
    """A fake with an engine step loop: one token of every request in the engine per step (a request
    ends after its last token). A request's tokens depend only on its prefix and its seed, as with
    per-request seeds on a real engine, whatever else is in the batch."""

    def __init__(self, script=None, **kw):
        super().__init__(script, **kw)
        self.running: dict[str, list] = {}  # request id -> [request, its result, steps left]
        self.occupancy: list[int] = []  # requests in the engine per step
        self.depths: list[set] = []  # distinct response lengths of the requests per step

    def _rng_for(self, req):
        seed = 0 if req.seed is None else req.seed
        return np.random.default_rng([seed, *(int(t) for t in req.prompt_ids)])

    def generate(self, requests):  # one batch: as many steps as its longest request, then it drains
        results = super().generate(requests)
        lengths = [max(1, len(r.token_ids)) for r in results]
        for k in range(max(lengths, default=0)):
            self.occupancy.append(sum(1 for n in lengths if n > k))
        return results

    def add_request(self, request_id, request):
        assert request_id not in self.running
        res = FakeBackend.generate(self, [request])[0]
        self.batches.pop()  # a stream has no batches
        self.running[request_id] = [request, res, max(1, len(res.token_ids))]

    def step_requests(self):
        self.occupancy.append(len(self.running))
        self.depths.append({len(r[0].prompt_ids) for r in self.running.values()})
        done = []
        for rid, entry in list(self.running.items()):
            entry[2] -= 1
            if entry[2] == 0:
                done.append((rid, entry[1]))
                del self.running[rid]
        return done

    @property
    def unfinished_requests(self):
        return len(self.running)


def grow_all(c, expansion, prompts, script, block, max_in_flight):
    fake = FakeStreamBackend(script, block_size=block)
    sampling = SamplingConfig(per_request_seed=True, expansion=expansion)
    sampler = TreeSampler(fake, c, sampling, EOS_IDS, decode)
    trees = {t.tree_id: t for t in sampler.run(prompts, max_in_flight=max_in_flight)}
    assert sampler.requests_in_engine == 0 and not fake.running
    return trees, fake


def same_trees(a, b):
    assert sorted(a) == sorted(b)
    for tree_id, x in a.items():
        y = b[tree_id]
        assert [(lf.node_id, lf.finish_reason, lf.length) for lf in x.leaves] == [
            (lf.node_id, lf.finish_reason, lf.length) for lf in y.leaves
        ]
        assert len(x.segments) == len(y.segments)
        for s1, s2 in zip(x.segments, y.segments):
            assert (s1.node_id, s1.parent_id, s1.depth, s1.version) == (
                s2.node_id,
                s2.parent_id,
                s2.depth,
                s2.version,
            )
            assert s1.token_ids.tolist() == s2.token_ids.tolist()
            assert s1.logprobs.tolist() == s2.logprobs.tolist()
        assert x.metadata == y.metadata


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes, st.integers(1, 3))
def test_barrier_free_grows_the_same_trees_as_level(s, max_in_flight):
    w = s["w"]
    l = s["l"] * (s["block"] if s["align"] else 1)
    rmin = min(s["rd"][0], w)
    c = TreeConfig(
        mode=s["mode"],
        w=w,
        d=s["d"],
        l=l,
        b=s["b"],
        root_divergence_min=rmin,
        root_divergence_max=min(rmin + s["rd"][1], w),
        max_response_tokens=max(1, int(s["d"] * l * s["lmax_frac"])),
        allocation=s["allocation"],
        remainder=s["remainder"],
        fallback=s["fallback"],
        answer_policy=s["answer_policy"],
        align_segments_to_blocks=s["align"],
        seed=s["seed"],
        repetition_substring_chars=4,
        repetition_min_count=3,
    )
    # prompts of different lengths: segment lengths differ across trees (aligned), so depths interleave
    prompts = [(f"p{i}", PROMPT + [97 + i] * (3 * i), {"answer": "5"}) for i in range(s["trees"] + 1)]
    script = random_script(*s["p"])
    level, _ = grow_all(c, "level", prompts, script, s["block"], max_in_flight)
    free, fake = grow_all(c, "barrier_free", prompts, script, s["block"], max_in_flight)
    same_trees(level, free)
    for tree in free.values():
        check_tree(tree, c, fake)


def test_barrier_free_keeps_the_batch_full_across_trees_and_depths():
    # aligned segments: the first one is stretched by a different amount per prompt length, so the
    # trees' depths end at different engine steps (and EOS ends some paths early)
    c = cfg(w=8, d=4, l=8, max_response_tokens=32, fallback="any", align_segments_to_blocks=True)
    prompts = [(f"p{i}", PROMPT + [97] * (3 * i)) for i in range(6)]
    script = random_script(0.3, 0.0, 0.0)
    level, lv = grow_all(c, "level", prompts, script, 8, 3)
    free, bf = grow_all(c, "barrier_free", prompts, script, 8, 3)
    same_trees(level, free)
    assert len(bf.occupancy) < len(lv.occupancy)  # fewer engine steps for the same tokens
    assert np.mean(bf.occupancy) > np.mean(lv.occupancy)
    assert any(len(d) > 1 for d in bf.depths)  # requests of different trees and depths in one step


def test_the_generator_drains_the_engine_before_an_update():
    import threading

    from actors.generator import Generator
    from common.config import load_config

    fake = FakeStreamBackend()
    sampling = SamplingConfig(expansion="barrier_free")
    sampler = TreeSampler(fake, cfg(w=4, d=3, l=4, max_response_tokens=12), sampling, EOS_IDS, decode)
    gen = Generator.__new__(Generator)  # the loop's update path only: no queue, no prompts
    gen.cfg, gen.backend, gen.sampler = load_config(None, []), fake, sampler
    gen._init_state()
    gen._staged_lock = threading.Lock()
    sampler.submit("p", PROMPT)
    sampler.step()
    gen._drain_for_update()  # no update pending: the segments stay in the engine
    assert sampler.requests_in_engine > 0
    assert gen.offer_weights({}, version=5, step=1)
    gen._drain_for_update()
    assert sampler.requests_in_engine == 0 and not fake.running
    gen._apply_pending()
    assert fake.policy_version == 5 and gen.weights_step == 1
    trees = list(gen._drained)
    while sampler.in_flight:
        trees += sampler.step()
    versions = {s.depth: s.version for s in trees[0].segments}
    assert versions == {1: 0, 2: 0, 3: 5}  # depth 2 finished under the weights it started with
