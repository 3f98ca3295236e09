"""The asynchronous pipeline end to end: real Ray (in-process, 2 CPUs), the real Redis of the session,
a vLLM CPU engine inside the generator actor, the real learner rank in its own actor.

Checks: a short run trains unique trees under bounded staleness with weights reaching the generator;
a generator killed mid-run restarts and no prompt is trained twice; a controller crash after a
checkpoint resumes without losing or repeating a tree. The schedule's rules are tested as
pure functions in ``tests/unit/common/test_schedule.py``.
"""

from __future__ import annotations

import time

import pytest
from pipeline_runs import audit_rows, finish, metrics_rows, run_in_thread, trained_prompts, wait_for_step
from ray_nodes import in_process_ray, small_pipeline_overrides

from common.config import load_config

PW_ENV = "TREEPO_TEST_PIPELINE_REDIS_PASSWORD"


# ------------------------------------------------------------------ the pipeline (real Ray)

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    """One in-process Ray with 2 CPUs for the module (1 learner + 1 generator)."""
    pytest.importorskip("vllm")
    with in_process_ray(2):
        yield


def _cfg(run_dir, model_dir, *extra):
    return load_config(None, small_pipeline_overrides(run_dir, model_dir, "checkpoint.every_steps=1", *extra))


def _queue_cfg(redis_server, monkeypatch):
    monkeypatch.setenv(PW_ENV, redis_server.password)
    return [f"queue.url={redis_server.url}", f"queue.password_env={PW_ENV}"]


def _finished_with_every_prompt_once(th, result: dict, run, after: str) -> list[dict]:
    """Wait for a 4-step run started by :func:`_run_until_first_step`; check that it succeeded and
    trained each of its 8 prompts exactly once; return its metrics."""
    finish(th, result, after=after)
    rows = audit_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    prompts = trained_prompts(rows)
    assert len(prompts) == len(set(prompts)) == 8, "a prompt was lost or trained twice"
    return metrics_rows(run)


def _run_until_first_step(run_pipeline, cfg, run_dir, timeout_s: float = 240.0):
    """Start the pipeline in a thread and return (thread, result) once step 1 is trained."""
    th, result = run_in_thread(run_pipeline, cfg)
    wait_for_step(run_dir, 1, th, timeout_s)
    return th, result


pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_synchronous_pipeline_trains_every_prompt_once_on_fresh_weights(
    tmp_path, tiny_model_dir, ray_local, redis_server, monkeypatch
):
    """``max_staleness=0`` through the asynchronous code: the trees of step k are sampled entirely
    under version k−1, i.e. generation waited for each weight update to reach the generator. And the
    same algorithm as the synchronous driver: replaying the trees each step trained, in order, through
    the local driver's learner gives the same weights (tolerance 1e-5: float32, one rank, the same
    seed; only summation order may differ)."""
    import copy

    from cluster.pipeline.controller import Controller, run_pipeline

    captured: list = []
    original = Controller.learn

    def capture(self, trees):
        captured.append(copy.deepcopy(trees))
        return original(self, trees)

    monkeypatch.setattr(Controller, "learn", capture)
    run = tmp_path / "run"
    # 6 prompts, 2 per step: the data runs out after step 3, before total_steps
    cfg = _cfg(
        run,
        tiny_model_dir,
        "learner.total_steps=5",
        "data.synthetic_train_size=6",
        "algo.max_staleness=0",
        # the random-init model never answers right: the length penalty makes rewards (and so the
        # advantages the replay below must reproduce) differ between leaves
        "reward.overlong_buffer=48",
        "eval.every_steps=3",
        "eval.max_problems=4",
        "eval.k=2",
        *_queue_cfg(redis_server, monkeypatch),
    )
    assert run_pipeline(cfg) == 0
    rows = audit_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["version"] for r in rows] == [1, 2, 3]
    ids = [t for r in rows for t in r["trees"]]
    assert len(ids) == len(set(ids)) == 6, "every prompt of the epoch is trained exactly once"
    m = metrics_rows(run)
    assert [x["step"] for x in m] == [0, 1, 2, 3]
    # held-out evaluation at the start and at step 3, on the generator's engine with the newest weights
    assert 0.0 <= m[0]["eval/accuracy"] <= 1.0 and m[0]["eval/version"] == 0
    assert 0.0 <= m[3]["eval/accuracy"] <= 1.0 and m[3]["eval/version"] == 3
    m = m[1:]
    assert all(x["staleness/max"] == 0 for x in m)
    for x in m:  # every segment of step k's trees was sampled under the weights of version k−1
        assert x["rollout/segment_version_min"] == x["rollout/segment_version_max"] == x["step"] - 1, x
    assert m[-1]["generator/updates"] >= 2 and m[-1]["generator/version"] >= 2
    for x in m:  # the tree metrics of every tree sampled in the step; the engine's work from the generator
        assert x["tree/leaves"] == x["rollout/trees_sampled"] * cfg.tree.w
        assert sum(v for k, v in x.items() if k.startswith("tree/leaf_depth/")) == x["tree/leaves"]
        assert sum(v for k, v in x.items() if k.startswith("tree/finish/")) == x["tree/leaves"]
        assert 1 <= x["tree/leaf_depth_mean"] <= cfg.tree.d and 0 < x["tree/decoded_vs_flat"] <= 1
        assert x["tree/branching/0"] >= 1 and x["tree/fallbacks"] >= x["tree/restarts"] >= 0
        assert x["rollout/decoded_tokens"] > 0 and 0 <= x["rollout/prefix_cache_hit_rate"] <= 1
    assert m[-1]["queue/dead_count"] == 0
    for name in ("config.yaml", "reward_curve.png", "staleness.png"):
        assert (run / name).exists(), name
    assert (run / "checkpoints" / "latest").exists()
    page = (run / "trees" / "step-000003.html").read_text()  # the eval step's tree pictures
    assert all(f'data-tree="{t.tree_id}"' in page for t in captured[2])  # both trees, every leaf
    assert page.count('data-leaf="') == sum(len(t.leaves) for t in captured[2])

    # the synchronous reference: the same trees, the same order, a fresh learner from the same model
    from learner.advantages import tree_advantages
    from learner.checkpoint import require_checkpoint
    from learner.rank import LearnerRank

    assert [len(t) for t in captured] == [2, 2, 2]
    ref = LearnerRank(cfg.model, cfg.algo, cfg.learner, seed=cfg.seed, temperature=cfg.sampling.temperature)
    ref_start = {n: t.clone() for n, t in ref.weights_for_sync()}
    try:
        for trees in captured:
            ref.train_step(trees, tree_advantages(trees, cfg.algo))
        assert ref.version == 3
        got = require_checkpoint(run / "checkpoints").model_state()
        ours = dict(ref.weights_for_sync())
        diffs = {n: float((ours[n].float() - got[n].float()).abs().max()) for n in got}
        assert set(got) <= set(ours) and max(diffs.values()) < 1e-5, sorted(
            diffs.items(), key=lambda x: -x[1]
        )[:3]
        moved = max(float((ours[n] - t).abs().max()) for n, t in ref_start.items())
        assert moved > 1e-4, "the replay did not train at all: the comparison would be vacuous"
    finally:
        ref.close()


@pytest.mark.slow
def test_generator_killed_mid_run_restarts_and_no_prompt_repeats(
    tmp_path, tiny_model_dir, ray_local, redis_server, monkeypatch
):
    from cluster.pipeline.controller import run_pipeline
    from cluster.pipeline.topology import generator_name
    from common.keys import run_name_for

    run = tmp_path / "run"
    cfg = _cfg(run, tiny_model_dir, "learner.total_steps=4", *_queue_cfg(redis_server, monkeypatch))
    th, result = _run_until_first_step(run_pipeline, cfg, run)
    gen = ray.get_actor(generator_name(run_name_for(run), 0))
    ray.kill(gen, no_restart=False)
    m = _finished_with_every_prompt_once(th, result, run, "a generator restart")
    assert m[-1]["pipeline/generator_restarts"] >= 1
    assert all(x["staleness/max"] <= 1 for x in m)  # algo.max_staleness=1


@pytest.mark.slow
def test_resume_after_controller_crash_loses_no_tree(
    tmp_path, tiny_model_dir, ray_local, redis_server, monkeypatch
):
    from cluster.pipeline.controller import Controller, run_pipeline

    run = tmp_path / "run"
    q = _queue_cfg(redis_server, monkeypatch)
    crashed: dict = {}
    original = Controller.learn

    def crash_on_third_step(self, trees):
        out = original(self, trees)
        if self.step == 2:  # the 3rd step's update exists only in memory: checkpoints are every 2 steps
            crashed["ids"] = sorted(t.tree_id for t in trees)
            raise RuntimeError("injected controller crash")
        return out

    monkeypatch.setattr(Controller, "learn", crash_on_third_step)
    with pytest.raises(RuntimeError, match="injected"):
        run_pipeline(_cfg(run, tiny_model_dir, "learner.total_steps=4", "checkpoint.every_steps=2", *q))
    assert [r["step"] for r in audit_rows(run)] == [1, 2]
    monkeypatch.setattr(Controller, "learn", original)

    assert run_pipeline(_cfg(run, tiny_model_dir, "learner.total_steps=4", "resume=true", *q)) == 0
    rows = audit_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert sorted(rows[2]["trees"]) == crashed["ids"], (
        "the unacknowledged trees were not trained after resume"
    )
    ids = [t for r in rows for t in r["trees"]]
    assert len(ids) == len(set(ids)) == 8, "a tree was trained twice"
    assert [x["step"] for x in metrics_rows(run)] == [1, 2, 3, 4], "metrics after the resume were lost"


@pytest.mark.slow
def test_stuck_weight_sync_fails_with_a_clear_error(
    tmp_path, tiny_model_dir, ray_local, redis_server, monkeypatch
):
    """A generator that never takes part in the broadcast: the sender's waits time out, the group is
    rebuilt once, the second failure stops the run with SyncError naming the timeout and the fix."""
    from cluster.pipeline.controller import run_pipeline
    from common.errors import SyncError

    monkeypatch.setenv("TREEPO_FAULTS", "sync_stall")
    run = tmp_path / "run"
    cfg = _cfg(
        run,
        tiny_model_dir,
        "learner.total_steps=2",
        "sync.timeout_s=3",
        *_queue_cfg(redis_server, monkeypatch),
    )
    t0 = time.perf_counter()
    with pytest.raises(
        SyncError,
        match=r"failed twice \(sync.timeout_s=3\).*timed out.*waiting for receiver ranks \[1\] to join",
    ):
        run_pipeline(cfg)
    assert time.perf_counter() - t0 < 240
    # the sync after step 1 failed: no checkpoint (nor acknowledgement) claims that step
    assert not (run / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_redis_restart_mid_run_and_a_malformed_entry(tmp_path, tiny_model_dir, ray_local, monkeypatch):
    """Redis (AOF, appendfsync always) restarts while generators push and the controller reads: the
    run finishes, every prompt is trained exactly once. A malformed entry in the stream lands in the
    dead-letter stream (counted) instead of stopping the run."""
    from cluster.pipeline.controller import run_pipeline
    from cluster.pipeline.redis_launcher import EmbeddedRedis
    from common.keys import RunKeys, run_name_for
    from common.replay import FIELD_SCHEMA, FIELD_TREE, SCHEMA_VERSION, connect

    server = EmbeddedRedis(tmp_path / "redis", appendfsync="always", maxmemory_mb=256).start()
    try:
        monkeypatch.setenv(PW_ENV, server.password)
        run = tmp_path / "run"
        cfg = _cfg(
            run,
            tiny_model_dir,
            "learner.total_steps=4",
            f"queue.url={server.url}",
            f"queue.password_env={PW_ENV}",
        )
        th, result = _run_until_first_step(run_pipeline, cfg, run)
        # a producer bug or a foreign writer: an entry that is not a tree (queued once the run runs: a
        # fresh start clears what an earlier attempt left in Redis)
        client = connect(server.url, server.password)
        client.xadd(
            RunKeys(run_name_for(run)).trees, {FIELD_TREE: b"\x00not a tree", FIELD_SCHEMA: SCHEMA_VERSION}
        )
        client.close()
        server.restart()
        m = _finished_with_every_prompt_once(th, result, run, "the Redis restart")
        assert m[-1]["queue/dead_count"] == 1
    finally:
        server.stop()
