"""Evaluation estimators, the paper's way.

- mean@k: the average reward-correctness over the k samples of a problem.
- pass@k: the unbiased estimator 1 − C(n−c, k)/C(n, k) from n samples with c correct.
- maj@k: majority vote over k answers drawn WITH replacement from the n samples, averaged over
  1000 bootstrap draws with seed 42 (ties broken by the answer seen first in the draw).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    # 1 - prod_{i=n-c+1}^{n} (1 - k/i), numerically stable
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """Most frequent non-empty answer; ties go to the one that appears first."""
    counts = Counter(a for a in answers if a)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a and counts[a] == best)


def maj_at_k(
    answers: Sequence[str | None], correct: Sequence[bool], k: int, draws: int = 1000, seed: int = 42
) -> float:
    """Bootstrap maj@k: P(the majority answer of k resampled answers is correct)."""
    n = len(answers)
    if n == 0 or len(correct) != n or not k >= 1:
        raise ValueError(f"maj@k needs equal non-empty answers/correct lists and k >= 1 (n={n}, k={k})")
    is_correct = {a: bool(c) for a, c in zip(answers, correct) if a}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(draws, k))
    hits = 0
    for row in idx:
        vote = majority_vote([answers[i] for i in row])
        hits += bool(vote is not None and is_correct.get(vote, False))
    return hits / draws
