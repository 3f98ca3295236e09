"""No prompt lost to staleness across a lost driver, end to end: real Ray (in-process, 2 CPUs), the
real Redis of the session, a vLLM CPU engine in the generator actor, the real learner rank.

The driver is lost after the checkpoint of step 2 with steps 3 and 4 trained past it (an exception
from the controller's learner call: nothing after the checkpoint is acknowledged, as after a
SIGKILL). With ``algo.max_staleness=0`` the resume finds the trees of the lost step 4 sampled by
weights that no longer exist: it drops them and re-issues their prompts. Counted from
``trained_trees.jsonl`` and the queue at the end, every prompt handed out was trained exactly once
(dynamic sampling is off, so none may end untrained) and none is left anywhere in the queue.
"""

from __future__ import annotations

import re

import pytest
from pipeline_runs import assert_queue_drained, audit_rows, metrics_rows, trained_prompts
from ray_nodes import in_process_ray, small_pipeline_overrides

from common.config import load_config

pytestmark = pytest.mark.integration
PW_ENV = "TREEPO_TEST_STALE_RESUME_REDIS_PASSWORD"
N_PROMPTS = 12


@pytest.fixture(scope="module")
def ray_local():
    """One in-process Ray with 2 CPUs for the module (1 learner + 1 generator)."""
    pytest.importorskip("vllm")
    with in_process_ray(2):
        yield


@pytest.mark.slow
def test_a_resume_reissues_the_prompts_of_trees_sampled_by_lost_weights(
    tmp_path, tiny_model_dir, ray_local, redis_server, monkeypatch, capsys
):
    from cluster.pipeline.consuming import encoded_prompt_ids
    from cluster.pipeline.controller import Controller, run_pipeline

    monkeypatch.setenv(PW_ENV, redis_server.password)
    run = tmp_path / "run"

    def cfg(*extra: str):
        return load_config(
            None,
            small_pipeline_overrides(
                run,
                tiny_model_dir,
                f"queue.url={redis_server.url}",
                f"queue.password_env={PW_ENV}",
                f"data.synthetic_train_size={N_PROMPTS}",
                "algo.max_staleness=0",
                "checkpoint.every_steps=2",
                "learner.total_steps=100",
                *extra,
            ),
        )

    original = Controller.learn

    def lost_in_fourth_step(self, trees):
        out = original(self, trees)
        if self.step == 3:  # the 4th update exists only in memory; step 3's row lies past the checkpoint
            raise RuntimeError("injected loss of the driver")
        return out

    monkeypatch.setattr(Controller, "learn", lost_in_fourth_step)
    with pytest.raises(RuntimeError, match="injected loss"):
        run_pipeline(cfg())
    assert [r["step"] for r in audit_rows(run)] == [1, 2, 3]
    monkeypatch.setattr(Controller, "learn", original)
    capsys.readouterr()

    assert run_pipeline(cfg("resume=true")) == 0
    out = capsys.readouterr().out
    said = re.search(r"(\d+) unacknowledged tree\(s\) re-delivered, (\d+) kept, (\d+) too stale", out)
    assert said, out
    redelivered, kept, reissued = map(int, said.groups())
    assert reissued >= 1 and redelivered == kept + reissued, out  # step 4's trees: the lost weights'

    rows = audit_rows(run)
    prompts = trained_prompts(rows)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert sorted(prompts) == sorted(set(prompts)), "a prompt was trained twice"
    assert set(prompts) == set(encoded_prompt_ids(cfg())), "a prompt was lost"
    assert len(prompts) == N_PROMPTS
    assert metrics_rows(run)[-1]["pipeline/reissued_stale"] >= reissued
    assert_queue_drained(run, redis_server, N_PROMPTS)
