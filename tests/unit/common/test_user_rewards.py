"""Reward functions users already wrote: ``file.py:function`` paths, verl's ``compute_score`` signature
(adapted by its parameter names), the batched form that sees prompts; all run in real verifier
subprocesses."""

from __future__ import annotations

import textwrap

import pytest

from actors.scoring import score_trees
from common.config import RewardConfig, load_config
from common.data import wire_metadata
from common.errors import ConfigError, RewardError
from common.rewards import RewardItem, UserReward, VerifierPool, resolve_reward
from common.rewards.user import BatchUserReward
from common.tree import Leaf, Segment, Tree

REWARDS = '''
import json

SEEN = []

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl's signature; a dict return with a score, as verl allows."""
    ok = ground_truth in solution_str and data_source == "math_dapo"
    return {"score": 1.0 if ok else 0.0, "index": extra_info["index"]}

def no_extra_info(data_source, solution_str, ground_truth):
    return float(ground_truth in solution_str)

def batched(data_sources, solution_strs, ground_truths, extra_infos, prompts):
    """verl's batch names plus the prompts: +1 when the answer is there and the prompt asked for it."""
    return [
        1.0 if gt in s and p.startswith("Q" + str(e["index"])) else -1.0
        for s, gt, e, p in zip(solution_strs, ground_truths, extra_infos, prompts)
    ]

def batched_without_prompts(data_sources, solution_strs, ground_truths, extra_infos):
    return [0.5] * len(solution_strs)

def batched_wrong_length(data_sources, solution_strs, ground_truths, extra_infos):
    return [1.0]

def sees_nested(response_text, answer, metadata):
    return float(metadata["extra_info"]["index"])

def four_required(a, b, c, d):
    return 0.0
'''


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


def verl_meta(index: int) -> dict:
    """Tree metadata of a verl-layout row (nested values travel as one JSON string)."""
    return wire_metadata({"data_source": "math_dapo", "extra_info": {"index": index, "split": "train"}})


def test_verl_signature_from_a_file_path(reward_file, pool):
    cfg = RewardConfig(wrong=0.0)  # a 0/1 function: the verdict's midpoint is 0.5
    fn = resolve_reward(f"{reward_file}:compute_score", cfg=cfg, pool=pool)
    assert isinstance(fn, UserReward)
    got = fn.judge_many([("x is 5", "5", verl_meta(0)), ("x is 6", "5", verl_meta(1))])
    assert [(s.reward, s.correct) for s in got] == [(1.0, True), (0.0, False)]
    assert fn.stats.errors == 0
    # a verl function without extra_info gets only what it declares
    short = resolve_reward(f"{reward_file}:no_extra_info", cfg=cfg, pool=pool)
    assert short.score_many([("5", "5", verl_meta(0))]) == [1.0]
    # a treepo-form function sees the nested metadata back as objects
    nested = resolve_reward(f"{reward_file}:sees_nested", pool=pool)
    assert nested.score_many([("", "", verl_meta(3))]) == [3.0]


def test_relative_file_path_is_made_absolute(reward_file, pool, monkeypatch):
    monkeypatch.chdir(reward_file.parent)
    fn = resolve_reward("my_rewards.py:no_extra_info", pool=pool)
    assert fn.spec == f"{reward_file}:no_extra_info"
    monkeypatch.chdir(reward_file.parent.parent)  # the workers use the absolute path
    assert fn.score_many([("5", "5", {})]) == [1.0]


def test_batched_form_sees_prompts(reward_file, pool):
    fn = resolve_reward(f"{reward_file}:batched", pool=pool)
    assert isinstance(fn, BatchUserReward) and fn.wants_prompts
    items = [
        RewardItem("is 5", "5", verl_meta(0), 0, "Q0: what is 2+3?"),
        RewardItem("is 5", "5", verl_meta(1), 0, "Q0: wrong prompt for index 1"),
        RewardItem("is 4", "5", verl_meta(2), 0, "Q2: what is 2+3?"),
    ]
    assert [(s.reward, s.correct) for s in fn.judge_many(items)] == [
        (1.0, True),
        (-1.0, False),
        (-1.0, False),
    ]
    assert fn.stats.calls == 3 and fn.stats.errors == 0
    assert resolve_reward(f"{reward_file}:batched_without_prompts", pool=pool).score_many(items) == [0.5] * 3
    # a batch that answers with the wrong length is an error: counted, the batch scored wrong
    bad = resolve_reward(f"{reward_file}:batched_wrong_length", pool=pool)
    assert bad.score_many(items) == [-1.0] * 3
    assert bad.stats.errors == 1 and "one value per response" in bad.stats.last_error


def test_batched_form_through_score_trees(reward_file, pool):
    """The generator's scoring path decodes each tree's prompt for rewards that want prompts."""
    vocab = "Q0: 5is"
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    prompt = [vocab.index(c) for c in "Q0: "]
    resp = [vocab.index(c) for c in "is 5"]
    tree = Tree(
        "t", "p", prompt, [Segment(1, 0, 1, resp, [-0.1] * len(resp), 0)], [Leaf(1, "eos", len(resp))]
    )
    tree.metadata.update({"answer": "5", **verl_meta(0)})
    score_trees([tree], resolve_reward(f"{reward_file}:batched", pool=pool), decode)
    assert (tree.leaves[0].reward, tree.leaves[0].correct) == (1.0, True)


def test_signature_and_path_errors(reward_file, tmp_path):
    with pytest.raises(RewardError, match="none of the reward forms.*compute_score"):
        resolve_reward(f"{reward_file}:four_required")
    with pytest.raises(RewardError, match="does not exist"):
        resolve_reward(f"{tmp_path}/nope.py:fn")
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_here\n")
    with pytest.raises(RewardError, match="importing .*broken.py failed .*ModuleNotFoundError"):
        resolve_reward(f"{broken}:fn")


def test_reward_server_config_rules():
    c = load_config(None, ["reward.url=http://127.0.0.1:9/score", "reward.retries=1"])
    assert c.reward.url.endswith("/score") and c.reward.retries == 1
    with pytest.raises(ConfigError, match="both set"):
        load_config(None, ["reward.url=http://127.0.0.1:9/score", "reward.fn=math"])
    with pytest.raises(ConfigError, match="not an http"):
        load_config(None, ["reward.url=127.0.0.1:9"])
    with pytest.raises(ConfigError, match="reward.retries"):
        load_config(None, ["reward.retries=-1"])
