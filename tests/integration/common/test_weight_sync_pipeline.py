"""The weight-sync group in the running pipeline when a generator dies right after it claimed its rank
in the group (before the group is built): learner rank 0's sender fails with SyncError within
``sync.timeout_s`` instead of waiting on the dead rank, the controller rebuilds the group (Ray restarts
the generator, which rejoins) and training goes on to the end of the data, every prompt once.

Real Ray (in-process), the session's Redis, the vLLM CPU engine in the generator actor; the death is
injected (a one-shot fault file the receiver reads: ``TREEPO_FAULT_DIR``)."""

from __future__ import annotations

import time

import pytest
from pipeline_runs import audit_rows, finish, metrics_rows, run_in_thread, trained_prompts
from ray_nodes import in_process_ray, small_pipeline_overrides

from common.config import load_config

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.integration, pytest.mark.slow]
PW_ENV = "TREEPO_TEST_SYNC_PIPELINE_REDIS_PASSWORD"
SYNC_TIMEOUT_S = 5


@pytest.fixture(scope="module")
def ray_local():
    pytest.importorskip("vllm")
    with in_process_ray(2):
        yield


def test_generator_killed_after_claiming_its_rank_is_rebuilt_around(
    tmp_path, tiny_model_dir, ray_local, redis_server, monkeypatch
):
    from cluster.pipeline.controller import run_pipeline

    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "sync_die_after_claim").touch()
    monkeypatch.setenv("TREEPO_FAULT_DIR", str(faults))
    monkeypatch.setenv(PW_ENV, redis_server.password)
    run = tmp_path / "run"
    cfg = load_config(
        None,
        small_pipeline_overrides(
            run,
            tiny_model_dir,
            "learner.total_steps=4",
            f"sync.timeout_s={SYNC_TIMEOUT_S}",
            f"queue.url={redis_server.url}",
            f"queue.password_env={PW_ENV}",
        ),
    )
    t0 = time.monotonic()
    th, result = run_in_thread(run_pipeline, cfg)
    finish(th, result, after="a generator killed after claiming its weight-sync rank")
    print(f"run with a generator killed after claiming its rank: {time.monotonic() - t0:.1f} s")
    assert not (faults / "sync_die_after_claim").exists(), "the fault was never injected"
    rows = audit_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    prompts = trained_prompts(rows)
    assert len(prompts) == len(set(prompts)) == 8, "a prompt was lost or trained twice"
    m = metrics_rows(run)
    # algo.max_staleness=1: the run only ends if the rebuilt group kept the generator's weights fresh
    assert m[-1]["pipeline/sync_failures"] >= 1 and m[-1]["pipeline/generator_restarts"] >= 1
