"""The off-policy schedule (common/schedule.py), pure."""

from __future__ import annotations

import pytest

from common.config import load_config
from common.errors import ConfigError
from common.schedule import admission_budget, check_sync_every, staleness_in_steps, versions_per_step


def test_admission_budget_matches_the_rule():
    # (S + v + 1)·B − (accepted + running), floored at 0
    assert admission_budget(1, 0, 4, accepted=0, running=0) == 8
    assert admission_budget(1, 0, 4, accepted=5, running=3) == 0
    assert admission_budget(1, 2, 4, accepted=9, running=2) == 5
    assert admission_budget(0, 3, 2, accepted=20, running=5) == 0  # never negative
    # synchronous mode: exactly one step's worth per version
    assert admission_budget(0, 0, 4, accepted=0, running=0) == 4
    assert admission_budget(0, 0, 4, accepted=4, running=0) == 0
    assert admission_budget(0, 1, 4, accepted=4, running=0) == 4
    # trees the controller dropped are replaced, not waited for
    assert admission_budget(0, 0, 4, accepted=4, running=0, dropped=3) == 3


def test_staleness_counts_whole_steps_of_policy_versions():

    def cfg(*extra):
        return load_config(None, ["learner.prompts_per_step=8", *extra])

    assert versions_per_step(cfg("learner.mini_batch_prompts=8").learner) == 1
    assert versions_per_step(cfg("learner.mini_batch_prompts=2", "learner.ppo_epochs=2").learner) == 8
    assert staleness_in_steps(cfg("learner.mini_batch_prompts=8", "algo.max_staleness=3")) == 3
    assert staleness_in_steps(cfg("learner.mini_batch_prompts=4", "algo.max_staleness=3")) == 1
    assert staleness_in_steps(cfg("learner.mini_batch_prompts=4", "algo.max_staleness=1")) == 0


def test_pipeline_refuses_a_sync_interval_the_staleness_bound_cannot_feed():
    check_sync_every(load_config(None, ["algo.max_staleness=1", "sync.every_steps=2"]))
    with pytest.raises(ConfigError, match="sync.every_steps"):
        check_sync_every(load_config(None, ["driver=local", "algo.max_staleness=0", "sync.every_steps=2"]))
    # config validation refuses it for the pipeline (`treepo train --print-config` included) ...
    with pytest.raises(ConfigError, match="sync.every_steps"):
        load_config(None, ["algo.max_staleness=0", "sync.every_steps=2"])
    # ... and not for the local driver, which has no staleness bound
    assert (
        load_config(None, ["driver=local", "algo.max_staleness=0", "sync.every_steps=2"]).sync.every_steps
        == 2
    )


def test_admission_budget_bounds_staleness_of_a_fifo_consumer():
    """Simulate one generator and a consumer training B trees per version in push order: the version
    a tree was admitted under is never more than S behind the learner that trains it."""
    for S in (0, 1, 2):
        for B in (1, 3):
            admitted_at: list[int] = []  # generator version when each tree was admitted
            gen_version = learner_version = 0
            for _ in range(40):
                n = admission_budget(S, gen_version, B, accepted=len(admitted_at), running=0)
                admitted_at += [gen_version] * n
                start = learner_version * B
                if len(admitted_at) >= start + B:
                    batch = admitted_at[start : start + B]
                    assert all(learner_version - v <= S for v in batch), (S, B, batch, learner_version)
                    learner_version += 1
                    gen_version = learner_version  # weights published and applied
            assert learner_version > 5
