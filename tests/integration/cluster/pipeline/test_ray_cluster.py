"""The pipeline on a real Ray cluster started with ``ray start`` (separate processes, as on a cluster):

- ``ray job submit --working-dir <repo> -- python -m cluster train ... driver=ray``, stopped
  (``ray job stop``) after a checkpoint, then the same command with ``--resume``: the second job
  succeeds and leaves metrics, checkpoints and the audit trail in the (absolute) run directory, with
  every step trained once and no tree lost or trained twice (the embedded Redis of the run directory
  keeps the queue across the two jobs);
- a second node joins the head: generators are pinned to it and the learner to the head by custom
  resources (``generators.ray_resources`` / ``learner.ray_resources``), the queue is the session's
  Redis (``queue.url``: the embedded one is refused on multi-node clusters), the driver connects
  through ``RAY_ADDRESS``; the generator ran on the other node and received the learner's weights.

One head for the module (the multi-node test adds its node after the single-node test ran: the
embedded Redis needs a one-node cluster). Ports, temp dir and auth token are the module's own, so
other Ray clusters on the machine are left alone (:mod:`ray_nodes`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from paths import REPO
from ray_nodes import AUTH_TOKEN, RAY_BIN, RayNode, node_env, small_pipeline_overrides

pytest.importorskip("ray")
pytest.importorskip("vllm")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PW_ENV = "TREEPO_TEST_CLUSTER_REDIS_PASSWORD"
# what the job's working-dir upload must not carry, whatever .gitignore says
UPLOAD_EXCLUDES = [".venv", "runs", ".git", ".hypothesis", ".pytest_cache", ".ruff_cache", "*.egg-info"]
# the test session's settings the job's processes need (tiny model cache, in-process vLLM, threads)
PASSED_ENV = (
    "TREEPO_CACHE",
    "VLLM_ENABLE_V1_MULTIPROCESSING",
    "OMP_NUM_THREADS",
    "HF_HUB_OFFLINE",
    "TOKENIZERS_PARALLELISM",
)
JOB_TIMEOUT_S = 240


# ------------------------------------------------------------------ cluster access


@pytest.fixture(scope="module")
def ray_head():
    """A ``ray start --head`` of 2 CPUs (one learner rank + one generator) with a ``learner_node``
    resource, for the whole module."""
    head = RayNode(num_cpus=2, resources={"learner_node": 1})
    yield head
    head.stop()


def _api(head: RayNode, path: str, method: str = "GET") -> dict:
    """The dashboard's REST API with the cluster's token (no in-process Ray client state involved)."""
    req = urllib.request.Request(
        head.dashboard_url + path, method=method, headers={"Authorization": f"Bearer {AUTH_TOKEN}"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _ray_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY_BIN, *args], env=node_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def _job_env() -> dict[str, str]:
    return {k: os.environ[k] for k in PASSED_ENV if k in os.environ}


def _submit(head: RayNode, overrides: list[str], *, resume: bool = False) -> str:
    """``ray job submit --no-wait`` of ``python -m cluster train``; returns the submission id."""
    sid = f"treepo-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"excludes": UPLOAD_EXCLUDES, "env_vars": _job_env()}
    out = _ray_cli(
        "job", "submit", "--address", head.dashboard_url, "--submission-id", sid,
        "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--no-wait",
        "--", "python", "-m", "cluster", "train", *(["--resume"] if resume else []), *overrides,
    )  # fmt: skip
    assert out.returncode == 0, f"ray job submit failed:\n{out.stdout}\n{out.stderr}"
    return sid


def _status(head: RayNode, sid: str) -> str:
    return _api(head, f"/api/jobs/{sid}")["status"]


def _logs(head: RayNode, sid: str) -> str:
    return _api(head, f"/api/jobs/{sid}/logs").get("logs", "")


def _wait_job(head: RayNode, sid: str, timeout_s: float = JOB_TIMEOUT_S) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = _status(head, sid)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1.0)
    _api(head, f"/api/jobs/{sid}/stop", method="POST")
    pytest.fail(f"job {sid} did not finish within {timeout_s:.0f} s; log tail:\n{_logs(head, sid)[-4000:]}")


def _alive_nodes(head: RayNode) -> dict[str, dict]:
    nodes = _api(head, "/api/v0/nodes?detail=1")["data"]["result"]["result"]
    return {n["node_id"]: n for n in nodes if n["state"] == "ALIVE"}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _latest(run_dir: Path) -> Path | None:
    """The checkpoint directory ``checkpoints/latest`` names (a text file), None before the first."""
    latest = run_dir / "checkpoints" / "latest"
    if not latest.exists():
        return None
    return run_dir / "checkpoints" / latest.read_text().strip()


def _latest_step(run_dir: Path) -> int | None:
    path = _latest(run_dir)
    return None if path is None else int(path.name.split("-")[-1])


# ------------------------------------------------------------------ the tests


def test_job_stopped_after_a_checkpoint_resumes_with_every_tree_trained_once(
    ray_head, tiny_model_dir, tmp_path
):
    """Two ``ray job submit`` runs of the same command on one run directory: the first is stopped
    (``ray job stop``'s REST call) after it trained a step past its last checkpoint, the second adds
    ``--resume``. The single-node cluster lets the run directory's embedded Redis hold the queue."""
    deadline = time.time() + 60  # a node another test added and stopped takes seconds to be declared dead
    while len(_alive_nodes(ray_head)) > 1:
        assert time.time() < deadline, "the embedded Redis needs a one-node cluster"
        time.sleep(1.0)
    t0 = time.time()
    run = tmp_path / "run"  # absolute: each job unpacks the working dir somewhere else
    # the stop lands one step after the first checkpoint, before the next one (steps take 0.3-1.5 s
    # here): it goes through the REST call `ray job stop` makes, since the CLI's own start-up
    # (seconds) would race the steps
    total, every = 12, 4
    args = small_pipeline_overrides(
        run, tiny_model_dir, f"learner.total_steps={total}", f"checkpoint.every_steps={every}"
    )
    sid = _submit(ray_head, args)

    def trained_past_checkpoint() -> bool:
        ckpt, path = _latest_step(run), run / "trained_trees.jsonl"
        return ckpt is not None and path.exists() and any(r["step"] > ckpt for r in _rows(path))

    deadline = time.time() + JOB_TIMEOUT_S
    while not trained_past_checkpoint():
        assert time.time() < deadline, (
            f"no checkpoint within {JOB_TIMEOUT_S} s:\n{_logs(ray_head, sid)[-4000:]}"
        )
        assert _status(ray_head, sid) in ("PENDING", "RUNNING"), _logs(ray_head, sid)[-4000:]
        time.sleep(0.2)
    assert _api(ray_head, f"/api/jobs/{sid}/stop", method="POST")["stopped"]
    assert _wait_job(ray_head, sid, 60) == "STOPPED", "the job finished before it could be stopped"
    t_first = time.time() - t0
    ckpt_step = _latest_step(run)
    before = _rows(run / "trained_trees.jsonl")
    assert every <= ckpt_step <= before[-1]["step"] < total, (ckpt_step, before)
    assert (_latest(run) / "model.safetensors").exists() and (run / "config.yaml").exists()
    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == [r["step"] for r in before]

    # the same command plus --resume: continues from the checkpoint with the queue intact
    sid = _submit(ray_head, args, resume=True)
    status = _wait_job(ray_head, sid)
    log = _logs(ray_head, sid)
    assert status == "SUCCEEDED", log[-4000:]
    assert f"[pipeline] resumed from step {ckpt_step}" in log and f"[pipeline] done: {total} steps" in log
    rows = _rows(run / "trained_trees.jsonl")
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    assert rows[:ckpt_step] == before[:ckpt_step], "checkpointed steps were rewritten"
    if before[-1]["step"] > ckpt_step:  # usual; a slow stop may land after the next checkpoint
        # the steps trained after the checkpoint were lost with the stop: their (unacknowledged)
        # trees are re-delivered and trained again after the resume (in any grouping)
        lost = {t for r in before[ckpt_step:] for t in r["trees"]}
        assert lost <= {t for r in rows[ckpt_step:] for t in r["trees"]}
    else:
        print(f"[note] the stop landed right after checkpoint {ckpt_step}: nothing to re-deliver")
    ids = [t for r in rows for t in r["trees"]]
    assert len(ids) == len(set(ids)) == 2 * total, "a tree was trained twice"
    prompts = [t.split("@")[0] for t in ids]
    assert len(prompts) == len(set(prompts)), "a prompt was trained twice"
    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == list(range(1, total + 1))
    assert _latest_step(run) == total
    print(f"[timing] stopped job {t_first:.1f} s, resumed job {time.time() - t0 - t_first:.1f} s")


def test_generators_on_a_second_node_receive_the_learners_weights(
    ray_head, tiny_model_dir, tmp_path, redis_server
):
    """Head (``learner_node``) + a second node (``generator_node``); the driver connects through
    ``RAY_ADDRESS``. ``algo.max_staleness=0`` makes every tree of step k wait for the weights of step
    k-1 on the remote generator, so the segment versions prove the weights crossed nodes."""
    t0 = time.time()
    worker = RayNode(num_cpus=1, resources={"generator_node": 1}, head_address=ray_head.gcs_address)
    try:
        alive = _alive_nodes(ray_head)
        assert len(alive) == 2, alive
        head_node = next(i for i, n in alive.items() if n["is_head_node"])
        run = tmp_path / "multi"
        total = 2
        args = small_pipeline_overrides(
            run,
            tiny_model_dir,
            f"learner.total_steps={total}",
            "algo.max_staleness=0",
            "checkpoint.every_steps=2",
            "generators.ray_resources={generator_node: 1}",
            "learner.ray_resources={learner_node: 1}",
            f"queue.url={redis_server.url}",
            f"queue.password_env={PW_ENV}",
        )
        env = node_env({"RAY_ADDRESS": ray_head.gcs_address, PW_ENV: redis_server.password})
        proc = subprocess.run(
            [sys.executable, "-m", "cluster", "train", *args],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=JOB_TIMEOUT_S,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

        actors = _api(ray_head, "/api/v0/actors?detail=1&limit=1000")["data"]["result"]["result"]
        gens = [a for a in actors if (a.get("name") or "").startswith("treepo-multi-")]
        assert len(gens) == 1, gens
        learners = [
            a for a in actors if a["class_name"] == "LearnerHost" and a["job_id"] == gens[0]["job_id"]
        ]
        assert len(learners) == 1, learners
        assert learners[0]["node_id"] == head_node, "the learner did not run on the learner_node (head)"
        assert gens[0]["node_id"] in alive and gens[0]["node_id"] != head_node, (
            "the generator ran on the head"
        )

        m = _rows(run / "metrics.jsonl")
        assert [x["step"] for x in m] == list(range(1, total + 1))
        for x in m:  # step k trained trees sampled entirely under version k-1, on the other node
            assert x["rollout/segment_version_min"] == x["rollout/segment_version_max"] == x["step"] - 1, x
        assert m[-1]["generator/updates"] >= 1 and m[-1]["generator/version"] >= 1, m[-1]
        assert m[-1]["queue/dead_count"] == 0
        print(f"[timing] multi-node {time.time() - t0:.1f} s")
    finally:
        worker.stop()
