"""A user's reward function that is wrong stops the run, under both drivers, with one line naming the
function and its first error; one that fails now and then prints one line a step; a run that trains
nothing is an error. Real engines, learner, verifier subprocesses (and Ray, Redis for driver=ray) on
8 arith prompts."""

from __future__ import annotations

import logging
import re
import textwrap

import pytest
from ray_nodes import in_process_ray, small_pipeline_overrides
from run_configs import local_config

from common.config import load_config
from common.errors import DataError, RewardError
from common.tasks import generate, write_jsonl

pytestmark = pytest.mark.integration

REWARDS = """
CALLS = [0]

def returns_text(response_text, answer, metadata):
    return "correct"

def batched_short(data_sources, solution_strs, ground_truths, extra_infos):
    return [1.0] * (len(solution_strs) - 1)

def always_wrong(response_text, answer, metadata):
    return -1.0

def flaky(response_text, answer, metadata):
    CALLS[0] += 1
    if CALLS[0] % 10 in (0, 3, 6):  # 30 % of the calls
        raise ValueError("no box in the response")
    return 1.0 if answer in response_text else -1.0
"""
STOPS = [
    ("returns_text", r"TypeError: reward function returned 'correct'"),
    ("batched_short", r"TypeError: batched reward function returned list of length \d+ for \d+ responses"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The user's reward file and 8 training prompts."""
    d = tmp_path_factory.mktemp("user")
    (d / "my_rewards.py").write_text(textwrap.dedent(REWARDS))
    return d / "my_rewards.py", write_jsonl(generate("arith", 8, seed=3, split="train"), d / "train.jsonl")


@pytest.fixture
def engine(vllm_backend, tiny_model_dir):
    """The session's vLLM engine, given back with its original weights and version."""
    import torch
    from transformers import AutoModelForCausalLM

    version = vllm_backend.policy_version
    yield vllm_backend
    original = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    vllm_backend.update_weights(original.named_parameters(remove_duplicate=False), version)
    vllm_backend.reset_prefix_cache()


def _local(tmp_path, model_dir, files, fn, *extra):
    reward_file, data = files
    return local_config(
        tmp_path / "run", model_dir, f"data.train={data}", f"reward.fn={reward_file}:{fn}", *extra
    )


@pytest.mark.parametrize("fn,first_error", STOPS)
def test_local_driver_stops_on_a_reward_that_always_fails(
    tmp_path, tiny_model_dir, engine, files, fn, first_error
):
    from cluster.local import train

    cfg = _local(tmp_path, tiny_model_dir, files, fn, "algo.dynamic_sampling=true", "learner.total_steps=2")
    with pytest.raises(
        RewardError, match=rf"reward my_rewards.py:{fn} failed on (\d+) of \1 calls.*{first_error}"
    ):
        train(cfg, backend=engine)
    assert not (tmp_path / "run" / "trained_trees.jsonl").exists()  # stopped before training on it


def test_local_driver_run_that_trains_nothing_fails(tmp_path, tiny_model_dir, engine, files):
    from cluster.local import train

    cfg = _local(tmp_path, tiny_model_dir, files, "always_wrong", "algo.dynamic_sampling=true")
    with pytest.raises(DataError, match=r"0 steps trained.*dynamic sampling dropped all 8 tree\(s\)"):
        train(cfg, backend=engine)


def test_a_reward_failing_on_30_percent_prints_one_line_a_step(
    tmp_path, tiny_model_dir, engine, files, capsys, caplog
):
    from cluster.local import train

    cfg = _local(tmp_path, tiny_model_dir, files, "flaky", "tree.w=8", "learner.total_steps=2")
    with caplog.at_level(logging.WARNING):
        assert train(cfg, backend=engine) == 0
    console = capsys.readouterr().out.splitlines()
    summaries = [line for line in console if line.startswith("[reward]")]
    assert [s.split(":")[0] for s in summaries] == ["[reward] step 1", "[reward] step 2"], console
    assert all(re.search(r"\d+/\d+ calls failed .*first error: ValueError: no box", s) for s in summaries)
    # the failure's kind is logged once, not once per failed call
    logged = [r.getMessage() for r in caplog.records if "no box in the response" in r.getMessage()]
    assert len(logged) == 1, logged


# ------------------------------------------------------------------ driver=ray


@pytest.fixture(scope="module")
def ray_local():
    pytest.importorskip("vllm")
    with in_process_ray(2):
        yield


RAY_STOPS = [(fn, rf"reward my_rewards.py:{fn} failed on (\d+) of \1 calls.*{error}") for fn, error in STOPS]
RAY_STOPS.append(("always_wrong", r"0 steps trained: .*dynamic sampling dropped all 8 tree\(s\)"))


@pytest.mark.parametrize("fn,error", RAY_STOPS)
def test_ray_driver_stops_on_a_reward_that_always_fails(
    tmp_path, tiny_model_dir, ray_local, redis_server, monkeypatch, capsys, files, fn, error
):
    """The generators score; the controller counts what the trees carry and stops the command with
    exit status 2 and one line naming the function and its first error (or, for a reward that never
    fails but scores everything wrong, the reason nothing was trained)."""
    from cluster.cli import main

    monkeypatch.setenv("TREEPO_TEST_FAILURES_REDIS_PASSWORD", redis_server.password)
    reward_file, data = files
    args = small_pipeline_overrides(
        tmp_path / "run",
        tiny_model_dir,
        f"queue.url={redis_server.url}",
        "queue.password_env=TREEPO_TEST_FAILURES_REDIS_PASSWORD",
        f"data.train={data}",
        f"reward.fn={reward_file}:{fn}",
        "algo.dynamic_sampling=true",
        "learner.total_steps=2",
    )
    load_config(None, args)  # valid as given
    assert main(["train", *args]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("treepo train: error")]
    assert len(errors) == 1 and re.search(error, errors[0]), errors
