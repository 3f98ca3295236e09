"""The built-in rewards: ``math`` (the last box, verified with math-verify), ``arith`` (the synthetic
task's exact integer check) and ``auto`` (per row, from ``metadata["task"]``). Rules in
:mod:`common.rewards`.
"""

from __future__ import annotations

from typing import Any

from common.answers import last_boxed
from common.rewards.base import Job, Reward
from common.rewards.verify import fast_math, strip_period, verify_boxed
from common.tasks import TASKS as SYNTHETIC_TASKS
from common.tasks import check_answer


class MathReward(Reward):
    """Last boxed answer, verified with math-verify (in a worker unless a fast path decides).

    ``isolate=False`` runs math-verify in the calling thread with NO timeout: only for trusted
    inputs (benchmarks, tests); rollouts from a policy can make sympy spin.
    """

    name = "math"

    def __init__(self, *, isolate: bool = True, **kw: Any) -> None:
        super().__init__(**kw)
        self.isolate = isolate

    def _prepare(self, text: str, answer: str, metadata: dict) -> float | Job:
        pred = last_boxed(text)
        if pred is None:
            return self.wrong
        pred = strip_period(pred)
        fast = fast_math(pred, answer)
        if fast is not None:
            return self.correct if fast else self.wrong
        if not self.isolate:
            return self.correct if verify_boxed(pred, answer) else self.wrong
        return Job({"op": "math", "pred": pred, "gold": answer})


class ArithReward(Reward):
    """The synthetic tasks (arith, arith2, long, calc): exact integer match of the last box
    (``common.tasks.check_answer``)."""

    name = "arith"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._check = check_answer

    def _prepare(self, text: str, answer: str, metadata: dict) -> float:
        # Our own regex + int comparison: bounded and safe in-process.
        return self.correct if self._check("arith", text, answer) else self.wrong


class AutoReward(Reward):
    """Per row: the arith reward when ``metadata["task"]`` is a synthetic task, the math reward otherwise."""

    name = "auto"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.math = MathReward(**kw)
        self._arith: ArithReward | None = None
        self._kw = kw

    def _sub(self, metadata: dict) -> Reward:
        if metadata.get("task") in SYNTHETIC_TASKS:
            if self._arith is None:
                self._arith = ArithReward(**self._kw)
            return self._arith
        return self.math

    def _prepare(self, text: str, answer: str, metadata: dict) -> float | Job:
        return self._sub(metadata)._prepare(text, answer, metadata)


def math_reward(
    response_text: str,
    answer: str,
    *,
    response_len: int = 0,
    max_response_tokens: int = 0,
    overlong_buffer: int = 0,
    correct: float = 1.0,
    wrong: float = -1.0,
    timeout_s: float = 5.0,
) -> float:
    """The paper's reward for one response (uses this process's shared verifier pool)."""
    fn = MathReward(
        correct=correct,
        wrong=wrong,
        timeout_s=timeout_s,
        overlong_buffer=overlong_buffer,
        max_response_tokens=max_response_tokens or None,
    )
    return fn(response_text, answer, None, response_len)


__all__ = [
    "ArithReward",
    "AutoReward",
    "MathReward",
    "math_reward",
]
