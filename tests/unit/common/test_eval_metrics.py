from __future__ import annotations

import math

import numpy as np
import pytest

from common.eval_metrics import maj_at_k, majority_vote, pass_at_k


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # 1 - C(8,3)/C(10,3) = 1 - 56/120
    assert pass_at_k(10, 2, 3) == pytest.approx(1 - 56 / 120)
    assert pass_at_k(16, 3, 16) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_majority_vote_ties_first_seen():
    assert majority_vote(["3", "4", "4", "3"]) == "3"
    assert majority_vote(["3", "4", "4"]) == "4"
    assert majority_vote([None, "", None]) is None


def test_maj_at_k_bootstrap_matches_a_direct_computation():
    answers = ["5", "5", "7", None]
    correct = [True, True, False, False]
    got = maj_at_k(answers, correct, k=3, draws=1000, seed=42)
    rng = np.random.default_rng(42)
    idx = rng.integers(0, 4, size=(1000, 3))
    expect = 0
    for row in idx:
        votes = [answers[i] for i in row if answers[i]]
        if votes:
            counts = {a: votes.count(a) for a in votes}
            best = max(counts.values())
            winner = next(a for a in votes if counts[a] == best)
            expect += winner == "5"
    assert got == expect / 1000
    assert maj_at_k(["1"] * 4, [True] * 4, k=2) == 1.0
    assert maj_at_k(["1"] * 4, [False] * 4, k=2) == 0.0
    assert not math.isnan(got)


def test_pass_at_k_equals_the_combinatorial_definition():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_maj_at_k_bootstrap_is_close_to_the_exact_probability():
    # P(majority of 3 draws is "a") with P(a) = 2/3 over {a, b}: 3·(2/3)²·(1/3) + (2/3)³ = 20/27
    got = maj_at_k(["a", "a", "b"], [True, True, False], k=3)
    assert abs(got - 20 / 27) < 0.05  # 1000 draws: standard error ≈ 0.014
    assert got == maj_at_k(["a", "a", "b"], [True, True, False], k=3)  # seed 42: reproducible


# ---------------------------------------------------------------------------------------------
# evaluate(): real TreeSampler, real arith reward and tokenizer; a scripted backend fixes every
# answer so the per-problem numbers can be computed by hand (a sampling engine cannot).
# ---------------------------------------------------------------------------------------------

FILLER = "1+1=2\n1+1=2\n1+1="  # 16 characters = one segment of l=16 tokens, no answer in it


class ScriptedBackend:
    """Each trajectory is FILLER then ``\\boxed{A}`` + EOS; A is popped from the prompt's script when a
    request first reaches the answer part (so siblings of a shared prefix get different answers)."""

    policy_version = 0
    block_size = 1  # no segment alignment

    def __init__(self, tok, scripts: dict[tuple[int, ...], list[str]], eos: int) -> None:
        from actors.backends.base import BackendCounters

        self.tok, self.scripts, self.eos = tok, {k: list(v) for k, v in scripts.items()}, eos
        self.counters = BackendCounters()
        self.filler = tok.encode(FILLER, add_special_tokens=False)

    def generate(self, requests):
        from actors.backends.base import GenResult

        out = []
        for req in requests:
            prompt = next(p for p in self.scripts if tuple(req.prompt_ids[: len(p)]) == p)
            done = len(req.prompt_ids) - len(prompt)
            toks = self.filler[done : done + req.max_tokens]
            if done + len(toks) >= len(self.filler) and len(toks) < req.max_tokens:
                answer = self.scripts[prompt].pop(0)
                toks += self.tok.encode(f"\\boxed{{{answer}}}", add_special_tokens=False) + [self.eos]
                toks = toks[: req.max_tokens]
            out.append(GenResult(toks, [-1.0] * len(toks), "stop", len(req.prompt_ids), 0))
        self.counters.add(out)
        return out

    def update_weights(self, named_tensors, version):  # pragma: no cover - not used
        raise NotImplementedError

    def reset_prefix_cache(self):
        pass


@pytest.mark.parametrize("sampling", ["flat", "tree"])
def test_evaluate_per_problem_metrics_by_hand(sampling):
    from actors.evaluator import evaluate
    from common.config import SamplingConfig, TreeConfig
    from common.data import EncodedPrompt, PromptRow
    from common.rewards import resolve_reward
    from common.tiny import build_tokenizer

    tok = build_tokenizer("arith")
    eos = tok.eos_token_id
    gold_script = {
        "p1": ("7", ["7", "3", "7", "7"]),
        "p2": ("5", ["4", "4", "4", "5"]),
        "p3": ("9", ["1", "2", "1", "2"]),
    }
    prompts, scripts = [], {}
    for i, (pid, (gold, script)) in enumerate(gold_script.items()):
        ids = tok.encode(f"Compute {i}+{gold}-{i}.\n", add_special_tokens=False)
        prompts.append(EncodedPrompt(PromptRow(pid, "", gold, {"task": "arith"}), ids))
        scripts[tuple(ids)] = script
    backend = ScriptedBackend(tok, scripts, eos)
    cfg = TreeConfig(d=2, l=16, b=2, max_response_tokens=32, align_segments_to_blocks=False)
    res = evaluate(
        backend, prompts, resolve_reward("arith"), tree_cfg=cfg, sampling_cfg=SamplingConfig(), eos_ids=[eos],
        decode=lambda ids: tok.decode(list(ids), skip_special_tokens=True), k=4, sampling=sampling,
    )  # fmt: skip
    p1, p2, p3 = res.problems
    assert [p.answers for p in res.problems] == [s for _, s in gold_script.values()]
    assert p1.correct == [True, False, True, True] and p3.correct == [False] * 4
    assert (p1.mean_at_k, p2.mean_at_k, p3.mean_at_k) == (0.75, 0.25, 0.0)
    assert (p1.pass_at_k, p2.pass_at_k, p3.pass_at_k) == (1.0, 1.0, 0.0)
    assert (p1.majority, p2.majority, p3.majority) == ("7", "4", "1")
    # exact maj@4 (ties 2-2 go to the answer drawn first): p=3/4 → 216/256; p=1/4 → 40/256
    assert abs(p1.maj_at_k - 216 / 256) < 0.05 and abs(p2.maj_at_k - 40 / 256) < 0.05 and p3.maj_at_k == 0.0
    s = res.summary()
    assert s["mean@4"] == pytest.approx(1 / 3) and s["pass@4"] == pytest.approx(2 / 3)
    assert s["maj@4"] == pytest.approx((p1.maj_at_k + p2.maj_at_k) / 3)
    assert res.trajectories == 12 and s["decoded_tokens"] == backend.counters.decoded_tokens
    # the tree shares each prompt's first segment between its 2 root children's subtrees
    per_answer = len(backend.filler) + len(tok.encode("\\boxed{7}", add_special_tokens=False)) + 1
    assert res.trajectory_tokens == 12 * per_answer
    shared = 0 if sampling == "flat" else 3 * 2 * len(backend.filler)
    assert res.decoded_tokens == 12 * per_answer - shared
