"""Failed reward calls: each one carries its error, a tree carries its failed calls through the queue,
a step's failures are one console line, and a step past ``reward.max_error_share`` stops the run
naming the function and its first error (real verifier subprocesses)."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable

import pytest

from actors.scoring import score_trees
from common.config import RewardConfig, load_config
from common.errors import ConfigError, RewardError
from common.rewards import VerifierPool, resolve_reward
from common.rewards.failures import FAILED_KEY, FIRST_KEY, StepFailures, reward_label, tree_failures
from common.tree import Leaf, Segment, Tree, decode_tree, encode_tree

REWARDS = """
def returns_text(response_text, answer, metadata):
    return "correct"

def fails_on_odd(response_text, answer, metadata):
    if int(response_text) % 2:
        raise ValueError("no box in " + response_text)
    return 1.0

def batched_short(data_sources, solution_strs, ground_truths, extra_infos):
    return [1.0] * (len(solution_strs) - 1)
"""


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "my_rewards.py"
    path.write_text(textwrap.dedent(REWARDS))
    return path


@pytest.fixture(scope="module")
def pool():
    p = VerifierPool(num_workers=2)
    yield p
    p.close()


def _tree(tree_id: str, texts: list[str]) -> tuple[Tree, Callable[[list[int]], str]]:
    """A tree with one root segment per text (one token per character) and its decoder."""
    vocab = sorted({c for t in texts for c in t} | {"?"})
    segs, leaves = [], []
    for i, text in enumerate(texts, start=1):
        ids = [vocab.index(c) for c in text]
        segs.append(Segment(i, 0, 1, ids, [-0.1] * len(ids), 0))
        leaves.append(Leaf(i, "eos", len(ids)))
    tree = Tree(tree_id, "p", [vocab.index("?")], segs, leaves, metadata={"answer": "1"})
    return tree, lambda ids: "".join(vocab[i] for i in ids)


def test_a_failed_call_carries_its_error_and_is_logged_once_per_kind(reward_file, pool, caplog):
    fn = resolve_reward(f"{reward_file}:returns_text", pool=pool)
    with caplog.at_level(logging.WARNING, logger="common.rewards.base"):
        got = fn.judge_many([(str(i), "1", {}) for i in range(6)])
    assert [(s.reward, s.correct) for s in got] == [(-1.0, False)] * 6
    assert all(s.error.startswith("TypeError: reward function returned 'correct'") for s in got)
    assert fn.stats.errors == 6
    lines = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]  # one line per kind, not one per call


def test_a_batch_with_the_wrong_count_fails_every_item(reward_file, pool):
    fn = resolve_reward(f"{reward_file}:batched_short", pool=pool)
    got = fn.judge_many([(str(i), "1", {}) for i in range(3)])
    assert [s.reward for s in got] == [-1.0] * 3
    assert all("of length 2 for 3 responses" in s.error for s in got)


def test_trees_carry_their_failures_through_the_wire(reward_file, pool):
    fn = resolve_reward(f"{reward_file}:fails_on_odd", pool=pool)
    tree, decode = _tree("t@e0", ["1", "2", "3", "4"])
    score_trees([tree], fn, decode)
    assert [lf.reward for lf in tree.leaves] == [-1.0, 1.0, -1.0, 1.0]
    back = decode_tree(encode_tree(tree))
    assert tree_failures(back) == (4, 2, "ValueError: no box in 1")
    # a tree without the keys (scored by a build without them) counts as none failed; forged counts are bounded
    del back.metadata[FAILED_KEY], back.metadata[FIRST_KEY]
    assert tree_failures(back) == (4, 0, "")
    back.metadata[FAILED_KEY] = 99
    assert tree_failures(back)[1] == 4
    ok, decode = _tree("u@e0", ["2", "4"])
    score_trees([ok], fn, decode)
    assert FAILED_KEY not in ok.metadata


def _scored(failed: int, calls: int = 4) -> Tree:
    tree, _ = _tree("t@e0", ["1"] * calls)
    if failed:
        tree.metadata.update({FAILED_KEY: failed, FIRST_KEY: "ValueError: no box"})
    return tree


def test_a_step_with_some_failures_is_one_line_and_goes_on():
    steps = StepFailures("my_rewards.py:score", 0.5, step_calls=8)
    for _ in range(5):  # 30 % of 20 calls
        steps.add_tree(_scored(failed=1 if _ % 5 else 2))
        steps.check()
    line = steps.summary(3)
    assert line == (
        "[reward] step 3: 6/20 calls failed (my_rewards.py:score), scored wrong; first error: ValueError: no box"
    )
    assert steps.close_step() == {"reward/failed_calls": 6.0, "reward/failed_share": 0.3}
    assert steps.summary(4) is None and steps.close_step()["reward/failed_calls"] == 0.0


def test_a_step_past_the_bound_stops_the_run_once_a_steps_calls_are_counted():
    steps = StepFailures("my_rewards.py:score", 0.5, step_calls=8)
    steps.add_tree(_scored(failed=4))
    steps.check()  # 4 calls: not yet a step's worth (every tree may be dropped: the step never ends)
    steps.add_tree(_scored(failed=4))
    with pytest.raises(
        RewardError,
        match=r"reward my_rewards.py:score failed on 8 of 8 calls.*first error: ValueError: no box",
    ):
        steps.check()
    early = StepFailures("f", 0.5, step_calls=100)
    early.add_tree(_scored(failed=3))
    with pytest.raises(RewardError, match="max_error_share=0.5"):
        early.close_step()  # the end of a step (or of the data) judges what it has
    never = StepFailures("f", 1.0, step_calls=1)
    never.add_tree(_scored(failed=4))
    never.close_step()


def test_the_bound_is_a_config_key_and_the_label_is_the_users_name(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    assert cfg.reward.max_error_share == 0.5
    steps = StepFailures.for_run(cfg)
    assert steps.step_calls == cfg.learner.prompts_per_step * cfg.tree.w
    with pytest.raises(ConfigError, match="reward.max_error_share"):
        load_config(None, [f"run_dir={tmp_path}", "reward.max_error_share=2"])
    assert reward_label(RewardConfig(fn="/home/me/my_rewards.py:score")) == "my_rewards.py:score"
    assert reward_label(RewardConfig(fn="pkg.mod:score")) == "pkg.mod:score"
    assert reward_label(RewardConfig(url="http://h:8000/score")) == "http://h:8000/score"
