"""docs/cluster.md's manual path ("An existing Ray cluster, or bare metal"), as a user runs it:

- the head: ``ray start --head --num-cpus=0 --num-gpus=0`` (no actor lands there) and
  ``bash cluster/head_redis.sh start`` (the replay Redis, password and ACL user of its own);
- a worker node: ``ray start --address=HEAD --resources='{"generator_node": 1, "learner_node": 1}'``;
- ``ray job submit --working-dir . -- bash cluster/head_redis.sh exec python -m cluster train ...``
  with both sides pinned by ``generators.ray_resources`` / ``learner.ray_resources`` and the queue
  read from ``TREEPO_QUEUE_URL``, as the presets do.

The job trains its steps through the head's Redis, its actors run on the worker, and the Redis is
stopped by ``head_redis.sh stop``. Ports, temp dirs and token are the test's own (:mod:`ray_nodes`).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
import uuid

import pytest
from paths import REPO
from ray_nodes import AUTH_TOKEN, RAY_BIN, RayNode, free_port, node_env, small_pipeline_overrides

pytest.importorskip("ray")
pytest.importorskip("vllm")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UPLOAD_EXCLUDES = [".venv", "runs", ".git", ".hypothesis", ".pytest_cache", ".ruff_cache", "*.egg-info"]
PASSED_ENV = ("VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")
JOB_TIMEOUT_S = 300


def _api(head: RayNode, path: str) -> dict:
    req = urllib.request.Request(head.dashboard_url + path, headers={"Authorization": f"Bearer {AUTH_TOKEN}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _head_redis(action: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "cluster/head_redis.sh", action],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _wait_job(head: RayNode, sid: str) -> str:
    deadline = time.time() + JOB_TIMEOUT_S
    while time.time() < deadline:
        status = _api(head, f"/api/jobs/{sid}")["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1.0)
    subprocess.run([RAY_BIN, "job", "stop", "--address", head.dashboard_url, sid], env=node_env(), timeout=60)
    return "TIMEOUT"


def test_the_manual_cluster_path_of_docs_cluster_md(tmp_path, tiny_model_dir):
    redis_env = {
        **os.environ,
        "TREEPO_REDIS_DIR": str(tmp_path / "redis"),
        "TREEPO_REDIS_PORT": str(free_port()),
        "TREEPO_REDIS_BIND": "127.0.0.1",
        "TREEPO_REDIS_MAXMEMORY": "256mb",
    }
    head = RayNode(num_cpus=0)
    worker = None
    started = _head_redis("start", redis_env)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        worker = RayNode(
            num_cpus=2, resources={"generator_node": 1, "learner_node": 1}, head_address=head.gcs_address
        )
        run = tmp_path / "run"
        overrides = small_pipeline_overrides(
            run,
            tiny_model_dir,
            "learner.total_steps=2",
            "checkpoint.every_steps=2",
            "generators.ray_resources={generator_node: 1}",
            "learner.ray_resources={learner_node: 1}",
            "queue.url=${oc.env:TREEPO_QUEUE_URL}",
            "queue.password_env=TREEPO_REDIS_PASSWORD",
        )
        env_vars = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env_vars["TREEPO_REDIS_DIR"] = redis_env["TREEPO_REDIS_DIR"]  # a job does not inherit the shell
        sid = f"treepo-doc-{uuid.uuid4().hex[:8]}"
        submit = subprocess.run(
            [
                RAY_BIN, "job", "submit", "--address", head.dashboard_url, "--submission-id", sid,
                "--working-dir", str(REPO),
                "--runtime-env-json", json.dumps({"excludes": UPLOAD_EXCLUDES, "env_vars": env_vars}),
                "--no-wait", "--",
                "bash", "cluster/head_redis.sh", "exec", "python", "-m", "cluster", "train", *overrides,
            ],
            env=node_env(), cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert submit.returncode == 0, submit.stdout + submit.stderr
        status = _wait_job(head, sid)
        logs = _api(head, f"/api/jobs/{sid}/logs").get("logs", "")
        assert status == "SUCCEEDED", logs[-5000:]

        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert rows[-1]["queue/dead_count"] == 0
        actors = _api(head, "/api/v0/actors?detail=1&limit=1000")["data"]["result"]["result"]
        head_node = next(
            n["node_id"]
            for n in _api(head, "/api/v0/nodes?detail=1")["data"]["result"]["result"]
            if n["is_head_node"]
        )
        mine = [a for a in actors if a["class_name"] in ("LearnerHost", "Generator")]
        assert {a["class_name"] for a in mine} == {"LearnerHost", "Generator"}, mine
        assert all(a["node_id"] != head_node for a in mine), "an actor ran on the head, which has no CPUs"
        status_out = _head_redis("status", redis_env)
        assert status_out.returncode == 0 and "7." in status_out.stdout, status_out.stdout + status_out.stderr
    finally:
        stopped = _head_redis("stop", redis_env)
        if worker is not None:
            worker.stop()
        head.stop()
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
