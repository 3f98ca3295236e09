"""The console of `treepo train` (the Ray driver, as the demo runs it): quiet by default, with the
engine's and Ray's output in the run directory, and the rollouts readable in rollouts.jsonl.

Runs the real command in a child process (its own local Ray, the embedded Redis, one generator with
the vLLM CPU engine, one learner rank) for 2 small steps, and counts what reaches the terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from ray_nodes import small_pipeline_overrides

pytestmark = pytest.mark.integration

MAX_CONSOLE_LINES = 12  # the notice, [eval]/[pipeline] lines, the done line; progress-bar redraws excluded


@pytest.mark.slow
def test_ray_driver_console_is_quiet_and_engine_logs_land_in_the_run_dir(tmp_path, tiny_model_dir):
    pytest.importorskip("vllm")
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "cluster",
        "train",
        *small_pipeline_overrides(run, tiny_model_dir),
        "learner.total_steps=2",
        "log.progress=true",
        "log.rollouts_every_steps=1",
    ]
    # a user's shell: no Ray address, and no VLLM_LOGGING_LEVEL (an in-process local-driver test earlier
    # in this session sets it, and the engine's INFO lines are what this test looks for in the files)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS") and k != "VLLM_LOGGING_LEVEL"
    }
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    console = r.stdout + r.stderr
    assert r.returncode == 0, console[-4000:]
    assert "Traceback" not in console, console[-4000:]
    lines = [
        line
        for chunk in console.splitlines()
        for line in [chunk.split("\r")[-1]]
        if line.strip() and not line.startswith("train[ray]:")
    ]
    assert len(lines) <= MAX_CONSOLE_LINES, "\n".join(lines)
    assert any("[pipeline] done: 2 steps" in line for line in lines), console[-2000:]
    assert not any("INFO" in line or "WARNING" in line for line in lines), "\n".join(lines)

    # what vLLM and Ray printed is in the run directory: the actors' output files of this job
    ray_logs = sorted((run / "logs" / "ray").iterdir())
    text = "".join(p.read_text(errors="replace") for p in ray_logs)
    assert "Initializing a V1 LLM engine" in text, [p.name for p in ray_logs]
    assert (run / "logs" / "driver.log").exists()

    # rollouts.jsonl: every trained tree of both steps, readable
    rows = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert sorted({row["step"] for row in rows}) == [1, 2] and len(rows) == 4  # 2 trees per step
    trained = [json.loads(line) for line in (run / "trained_trees.jsonl").read_text().splitlines()]
    assert {row["tree_id"] for row in rows} == {t for step in trained for t in step["trees"]}
    for row in rows:
        assert row["prompt"] and len(row["leaves"]) == 4  # tree.w=4
        for leaf in row["leaves"]:
            assert isinstance(leaf["text"], str) and leaf["finish_reason"]
            assert leaf["advantage"] is not None and leaf["reward"] is not None
            assert 1 <= leaf["depth"] == len(leaf["versions"]) <= 2  # tree.d=2
