"""Rewards: the paper's boxed-answer math reward, the synthetic task's reward, user reward functions.

Rule (TreePO, following the authors' release): a leaf scores ``correct`` (+1) if the LAST complete
``\\boxed{...}`` (or ``\\fbox{...}``) in its response verifies against the ground truth with
math-verify, else ``wrong`` (-1); a response without a box is wrong. DAPO's overlong penalty is
added when ``overlong_buffer > 0``: beyond ``Lmax - buffer`` response tokens add
``-(len - (Lmax - buffer)) / buffer``, clipped at -1 (the full penalty at ``len >= Lmax``).

Deviations and decisions:

- The penalty is applied to every reward kind (math, arith, user functions): it is a property of the
  response length, configured once in ``reward.overlong_buffer``.
- A reward call can never hang or kill a worker. math-verify's own timeout uses ``signal.alarm``,
  which only works on the main thread (generators call rewards from Ray actor threads), so
  verification runs in a small pool of persistent subprocesses (``python -c``, JSON lines over
  pipes: no pickle, no ``multiprocessing`` re-import of ``__main__``, so it works the same in a
  Ray actor, a thread, or a plain script). A call past its deadline kills that worker (a fresh one
  is started on the next use) and scores ``wrong``; a crash scores ``wrong``. Both are counted in
  :class:`RewardStats`; neither is fatal.
- In-process fast paths, exact and cheap: no box -> wrong; the boxed text equals the gold text
  (whitespace and ``$`` ignored) -> correct; both are plain integers -> exact integer comparison
  (math-verify agrees on these, tested). Everything else goes to math-verify in a worker.
- The gold answer is parsed with LaTeX and expression extraction; a bare gold answer is wrapped in
  ``$...$``. If that yields nothing (e.g. ``\\$5``: a dollar sign inside the math delimiters), it
  is retried as ``\\boxed{gold}`` and then as given.
- math-verify behaviour we keep as is (tested): ``50\\%`` equals both ``50`` and ``0.5``; units in
  ``\\text{}`` are dropped (``5\\text{ cm}`` == ``5``); ``x=2`` equals ``2``; sets ignore order
  (``1,2`` == ``2,1``); decimals are compared after rounding to 6 places (``1/3`` == ``0.333333``
  but ``!= 0.33``); ``\\pi`` != ``3.14159``; ``1e3`` is NOT 1000 (parsed as ``1*e*3``).
- One final period inside the box is dropped (``\\boxed{5.}`` == 5; math-verify finds nothing in ``5.``).
- A truncated final box (``\\boxed{2`` at the end of a cut response) is not an answer: the last
  COMPLETE box wins.

The verdict: a leaf is CORRECT when its reward before the overlong penalty is above the midpoint of
``correct`` and ``wrong`` (:meth:`Reward.judge_many`; for the built-in rewards the base reward is
exactly one of the two). It is judged before the penalty so that a long right answer stays right and
a long wrong one stays wrong: dynamic sampling and accuracies use the verdict, never the shaped value.

``auto`` picks the task's reward: the synthetic ``arith`` task's exact-integer check for rows whose
``metadata["task"] == "arith"`` (or when the task is known at start-up), math-verify otherwise.

Modules, one job each: :mod:`~common.rewards.verify` (the pure verifier and the overlong penalty),
:mod:`~common.rewards.pool` (the verifier worker pool) and :mod:`~common.rewards.worker` (a worker's
side of it), :mod:`~common.rewards.base` (what every reward shares), :mod:`~common.rewards.builtin`
(math, arith, auto), :mod:`~common.rewards.user_fns` and :mod:`~common.rewards.user` (user reward
functions), :mod:`~common.rewards.server` (the HTTP reward) and :mod:`~common.rewards.resolve` (the
factory).
"""

from __future__ import annotations

from common.answers import last_boxed
from common.rewards.base import RewardFn, RewardItem, RewardStats, Scored
from common.rewards.builtin import ArithReward, AutoReward, MathReward, math_reward
from common.rewards.pool import Outcome, VerifierPool, shared_pool
from common.rewards.resolve import resolve_reward
from common.rewards.user import UserReward
from common.rewards.user_fns import load_user_fn
from common.rewards.verify import overlong_penalty, verify_boxed

__all__ = [
    "ArithReward",
    "AutoReward",
    "MathReward",
    "Outcome",
    "RewardFn",
    "RewardItem",
    "RewardStats",
    "Scored",
    "UserReward",
    "VerifierPool",
    "last_boxed",
    "load_user_fn",
    "math_reward",
    "overlong_penalty",
    "resolve_reward",
    "shared_pool",
    "verify_boxed",
]
