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
