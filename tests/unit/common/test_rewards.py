"""Rewards: boxed extraction, math-verify on real answer variants, overlong penalty, isolation.

The expected verdicts below were checked against math-verify 0.9 by running it; where it differs
from intuition the docstring of common.rewards records the decision (e.g. percentages).
"""

from __future__ import annotations

import threading
import time

import pytest
from paths import TEST_DATA

from common.config import RewardConfig
from common.errors import RewardError
from common.rewards import (
    MathReward,
    RewardFn,
    RewardItem,
    UserReward,
    VerifierPool,
    last_boxed,
    math_reward,
    overlong_penalty,
    resolve_reward,
    verify_boxed,
)
from common.rewards.verify import fast_math

FIXTURES = TEST_DATA


@pytest.fixture(scope="module")
def pool():
    p = VerifierPool(num_workers=2)
    p.warm_up()
    yield p
    p.close()


@pytest.fixture(scope="module")
def math_fn(pool):
    return MathReward(pool=pool)


@pytest.fixture(scope="module")
def user_path():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(FIXTURES))
        yield


# ------------------------------------------------------------------------------------------- boxes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{5}.", "5"),
        ("\\boxed{\\frac{\\sqrt{2}}{2}} and then some words", "\\frac{\\sqrt{2}}{2}"),
        ("first \\boxed{1} then \\boxed{2} finally \\fbox{3} text", "3"),
        ("\\fbox{x+1}", "x+1"),
        ("\\boxed {7}", "7"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{2} then a truncated \\boxed{3", "2"),  # last COMPLETE box wins
        ("no box here: 5", None),
        ("\\boxed{", None),
        ("\\boxed{}", ""),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


# ------------------------------------------------------------------------------------- math-verify

CORRECT = [
    ("\\boxed{\\frac{1}{2}}", "1/2"),
    ("\\boxed{1/2}", "\\frac{1}{2}"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{1}{2}}", "1/2"),
    ("\\boxed{\\sqrt2}", "\\sqrt{2}"),
    ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}"),
    ("\\boxed{2\\sqrt{3}}", "2\\sqrt{3}"),
    ("\\boxed{\\pi}", "\\pi"),
    ("\\boxed{5\\text{ cm}}", "5"),  # units are dropped
    ("\\boxed{5}", "5\\text{ cm}"),
    ("\\boxed{50}", "50\\%"),  # decision: accept math-verify's lenient percentages ...
    ("\\boxed{0.5}", "50\\%"),  # ... both 50 and 0.5 match 50%
    ("\\boxed{(1,2]}", "(1,2]"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}"),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),
    ("The answer is \\boxed{\\frac{\\sqrt{2}}{2}}. I hope this helps!", "\\frac{\\sqrt{2}}{2}"),
    ("\\boxed{3} no wait \\boxed{\\frac{1}{2}}", "1/2"),  # several boxes: the last wins
    ("\\boxed{x=2}", "2"),
    ("\\boxed{2,1}", "1,2"),  # sets ignore order
    ("\\boxed{1000}", "1,000"),
    ("\\boxed{0.333333}", "\\frac{1}{3}"),  # decimals rounded to 6 places
    ("\\boxed{5}", "\\$5"),  # a dollar sign inside the gold: retried as a box
    ("\\fbox{-\\frac{1}{2}}", "\\frac{-1}{2}"),
    ("\\boxed{5.}", "5"),  # one final period dropped (math-verify alone finds nothing in "5.")
    ("\\boxed{\\frac{3}{4}.}", "0.75"),
    ("\\boxed{1,2}", "(1,2)"),  # math-verify quirk kept: an open-interval gold matches the set {1, 2}
    ("\\boxed{x \\in [2,5)}", "[2, 5)"),
    ("\\boxed{C}", "\\text{(C)}"),
]

WRONG = [
    ("\\boxed{\\frac{1}{3}}", "1/2"),
    ("\\boxed{3}", "2"),
    ("\\boxed{(1,2)}", "(1,2]"),  # wrong interval endpoint
    ("\\boxed{[1,2]}", "(1,2]"),
    ("\\boxed{(1,3]}", "(1,2]"),
    ("the answer is 1/2", "1/2"),  # no box
    ("\\boxed{\\frac{1}{2}} no wait \\boxed{3}", "1/2"),  # the last box is wrong
    ("\\boxed{1/2", "1/2"),  # unclosed box
    ("\\boxed{}", "1/2"),
    ("\\boxed{3.14159}", "\\pi"),  # numbers are not rounded to pi
    ("\\boxed{0.33}", "\\frac{1}{3}"),
    ("\\boxed{1000}", "1e3"),  # quirk: math-verify parses 1e3 as 1*e*3
    ("\\boxed{-\\infty}", "\\infty"),
    ("\\boxed{5..}", "5"),
]


@pytest.mark.parametrize("text, gold", CORRECT)
def test_math_correct_variants(math_fn, text, gold):
    assert math_fn(text, gold) == 1.0


@pytest.mark.parametrize("text, gold", WRONG)
def test_math_wrong_variants(math_fn, text, gold):
    assert math_fn(text, gold) == -1.0


@pytest.mark.parametrize(
    "pred, gold", [("3", "3"), ("3", "2"), ("-4", "-4"), ("+4", "4"), ("007", "7"), ("12", "21"), ("0", "-0")]
)
def test_integer_fast_path_agrees_with_math_verify(pred, gold):
    fast = fast_math(pred, gold)
    assert fast is not None
    assert fast == verify_boxed(pred, gold)


def test_fast_path_counted_and_order_kept(math_fn):
    before = math_fn.stats.in_process
    items = [
        RewardItem("\\boxed{3}", "3"),
        ("\\boxed{\\frac{2}{4}}", "1/2", None, 0),
        RewardItem("nothing", "3"),
        RewardItem("\\boxed{\\frac{1}{3}}", "1/2"),
        RewardItem("\\boxed{ 1/2 }", "$1/2$"),
    ]
    assert math_fn.score_many(items) == [1.0, 1.0, -1.0, -1.0, 1.0]
    assert math_fn.stats.in_process - before == 3


def test_stats_are_picklable_and_exported(math_fn):
    import pickle

    stats = pickle.loads(pickle.dumps(math_fn.stats))
    assert stats.calls == math_fn.stats.calls > 0
    stats.add(errors=1)  # the lock was rebuilt
    metrics = math_fn.stats.as_metrics()
    assert set(metrics) == {
        "reward/calls",
        "reward/timeouts",
        "reward/errors",
        "reward/in_process",
        "reward/seconds",
    }


def test_math_from_other_thread(math_fn):
    out = []
    t = threading.Thread(target=lambda: out.append(math_fn("\\boxed{\\sqrt{12}}", "2\\sqrt{3}")))
    t.start()
    t.join(30)
    assert out == [1.0]


def test_math_reward_function_uses_config_values():
    kw = dict(max_response_tokens=1024, overlong_buffer=512, correct=2.0, wrong=0.0, timeout_s=5.0)
    assert math_reward("\\boxed{\\dfrac{3}{4}}", "0.75", response_len=100, **kw) == 2.0
    assert math_reward("\\boxed{3}", "4", response_len=768, **kw) == -0.5
    cfg = RewardConfig(fn="math", correct=3.0, wrong=-2.0, overlong_buffer=0)
    fn = resolve_reward(cfg.fn, None, cfg=cfg)
    assert isinstance(fn, RewardFn)
    assert fn("\\boxed{4}", "4") == 3.0 and fn("\\boxed{5}", "4") == -2.0


# -------------------------------------------------------------------------------- overlong penalty


@pytest.mark.parametrize(
    "length, expected", [(0, 0.0), (512, 0.0), (513, -1 / 512), (768, -0.5), (1024, -1.0), (5000, -1.0)]
)
def test_overlong_penalty_values(length, expected):
    assert overlong_penalty(length, 1024, 512) == pytest.approx(expected)
    assert overlong_penalty(length, 1024, 0) == 0.0


def test_overlong_penalty_added_to_reward(math_fn, pool):
    fn = MathReward(pool=pool, max_response_tokens=7168, overlong_buffer=512)
    assert fn("\\boxed{2}", "2", None, 7168 - 512) == 1.0
    assert fn("\\boxed{2}", "2", None, 7168 - 256) == pytest.approx(0.5)
    assert fn("\\boxed{2}", "3", None, 7168) == pytest.approx(-2.0)
    with pytest.raises(RewardError, match="max_response_tokens"):
        MathReward(overlong_buffer=512)


def test_the_verdict_is_judged_before_the_overlong_penalty(pool):
    fn = MathReward(pool=pool, max_response_tokens=7168, overlong_buffer=512)
    items = [
        ("\\boxed{2}", "2", None, 7168),
        ("\\boxed{2}", "2", None, 7168 - 256),
        ("\\boxed{2}", "3", None, 7168),
    ]
    got = fn.judge_many(items)
    assert [s.reward for s in got] == pytest.approx([0.0, 0.5, -2.0])  # a full penalty lands on the midpoint
    assert [s.correct for s in got] == [True, True, False]
    # judged against the midpoint of reward.correct and reward.wrong
    shifted = MathReward(pool=pool, correct=2.0, wrong=0.0)
    assert [s.correct for s in shifted.judge_many([("\\boxed{1}", "1"), ("none", "1")])] == [True, False]


# ---------------------------------------------------------------------------------- arith and auto


def test_arith_reward_contract():
    pytest.importorskip("common.tasks")
    fn = resolve_reward("arith")
    assert fn("so the sum is \\boxed{12}", "12") == 1.0
    assert fn("\\boxed{ -7 }", "-7") == 1.0
    assert fn("\\boxed{12.0}", "12") == -1.0  # exact integers only
    assert fn("\\boxed{13}", "12") == -1.0
    assert fn("12", "12") == -1.0


def test_auto_picks_task_reward():
    pytest.importorskip("common.tasks")
    assert resolve_reward("auto", "arith").name == "arith"
    assert resolve_reward("auto", "math").name == "math"
    auto = resolve_reward("auto", None)
    # the same response: exact-integer rule for arith rows, math-verify for the rest
    assert auto("\\boxed{12.0}", "12", {"task": "arith"}) == -1.0
    assert auto("\\boxed{12.0}", "12", {}) == 1.0
    with pytest.raises(RewardError, match="unknown"):
        resolve_reward("auto", "chess")


# ---------------------------------------------------------------------------------- user functions


def test_user_reward_runs_isolated(user_path, pool):
    fn = resolve_reward("treepo_test_rewards:length_bonus", pool=pool)
    assert fn.score_many([("it is 42", "42", {}, 0), ("nope", "42", {"miss": -0.25}, 0)]) == [0.5, -0.25]
    # a user function's value is judged against the midpoint of correct (1) and wrong (-1)
    assert [s.correct for s in fn.judge_many([("it is 42", "42"), ("nope", "42", {"miss": -0.25})])] == [
        True,
        False,
    ]
    noisy = UserReward("treepo_test_rewards:prints_noise", pool=pool)
    assert noisy("x", "y") == 1.0 and noisy("x", "y") == 1.0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_treepo:fn", "cannot import module"),
        ("treepo_test_rewards:missing", "has no attribute"),
        ("treepo_test_rewards:NOT_CALLABLE", "not a function"),
        ("treepo_test_rewards:two_args", "signature"),
        ("treepo_test_rewards:", "package.module:function"),
        ("chess", "unknown"),
    ],
)
def test_dotted_path_errors(user_path, spec, message):
    with pytest.raises(RewardError, match=message):
        resolve_reward(spec)


def test_timeout_and_crashes_are_counted_not_fatal(user_path):
    pool = VerifierPool(num_workers=1)
    try:
        pool.warm_up()
        hang = UserReward("treepo_test_rewards:sleeps_forever", pool=pool, timeout_s=0.5)
        t0 = time.monotonic()
        assert hang("x", "y") == -1.0
        assert time.monotonic() - t0 < 2.0  # the deadline plus killing the worker
        assert (hang.stats.calls, hang.stats.timeouts, hang.stats.errors) == (1, 1, 0)

        for name, why in [
            ("raises", "ZeroDivisionError"),
            ("exits", "exited"),
            ("returns_text", "finite float"),
        ]:
            bad = UserReward(f"treepo_test_rewards:{name}", pool=pool, timeout_s=30)
            assert bad("x", "y") == -1.0
            assert (bad.stats.errors, bad.stats.timeouts) == (1, 0), name
            assert why in bad.stats.last_error

        # the pool recovered: a replacement worker answers (its start-up is not part of the deadline)
        ok = UserReward("treepo_test_rewards:length_bonus", pool=pool, timeout_s=0.5)
        assert ok("42", "42") == 0.5 and ok.stats.timeouts == 0
    finally:
        pool.close()


def test_timeout_from_worker_thread(user_path):
    pool = VerifierPool(num_workers=1)
    try:
        hang = UserReward("treepo_test_rewards:sleeps_forever", pool=pool, timeout_s=0.3)
        out = []
        t = threading.Thread(target=lambda: out.append(hang.score_many([("a", "b", {}, 0)] * 2)))
        t.start()
        t.join(60)
        assert out == [[-1.0, -1.0]] and hang.stats.timeouts == 2
    finally:
        pool.close()


@pytest.mark.integration
def test_rewards_inside_ray_actors():
    ray = pytest.importorskip("ray")

    # defined here so Ray ships it by value (the test module is not importable in Ray workers)
    class _ScorerActor:
        """A plain class turned into a Ray actor below (threaded when max_concurrency > 1)."""

        def __init__(self, fixtures: str) -> None:
            import sys

            sys.path.insert(0, fixtures)
            self.math = resolve_reward("math")
            self.hang = UserReward("treepo_test_rewards:sleeps_forever", timeout_s=0.5)

        def score(self):
            got = self.math.score_many(
                [("\\boxed{\\dfrac{1}{2}}", "0.5", None, 0), ("\\boxed{\\sqrt{12}}", "3", None, 0)]
            )
            hung = self.hang("x", "y")
            return (
                got,
                hung,
                self.hang.stats.timeouts,
                threading.current_thread() is threading.main_thread(),
            )

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for concurrency, on_main in [(1, True), (2, False)]:
            actor = ray.remote(max_concurrency=concurrency)(_ScorerActor).remote(str(FIXTURES))
            got, hung, timeouts, main_thread = ray.get(actor.score.remote(), timeout=120)
            assert (got, hung, timeouts, main_thread) == ([1.0, -1.0], -1.0, 1, on_main)
            ray.kill(actor)
    finally:
        if started:
            ray.shutdown()


def test_every_synthetic_task_has_its_built_in_reward():
    from common.rewards import resolve_reward
    from common.tasks import TASKS, generate

    for task in TASKS:
        reward = resolve_reward("auto", task)
        row = generate(task, 1, seed=0, split="eval")[0]
        assert reward(row["solution"], row["answer"], {"task": task}) == 1.0, task
        wrong = reward("The answer is \\boxed{-1}", row["answer"], {"task": task})
        assert wrong == -1.0, task  # reward.wrong
