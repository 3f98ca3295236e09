"""No engine process outlives its command: every engine-starting command (``bench sampling``,
``sample``, ``eval``, ``bench eval``) run with the MULTIPROCESS vLLM engine leaves no process
behind when it completes and when it gets SIGTERM mid-run; and when the command itself is
SIGKILLed, the engine processes notice (``actors/backends/engine_guard.py``) and stop.

Each command runs as ``python -m cluster`` in a session of its own, so every process it started
(the vLLM engine core and its workers), re-parented or not, is found by its session id in ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from paths import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENGINE_READY = "init engine"  # the engine core's log line once the model is loaded and warmed up


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (zombies aside)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def wait_until_gone(sid: int, timeout_s: float) -> list[int]:
    """Poll until session ``sid`` has no live process; returns what is left after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (left := session_pids(sid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def describe(pids: list[int]) -> str:
    names = []
    for pid in pids:
        try:
            names.append(f"{pid}:{Path(f'/proc/{pid}/cmdline').read_bytes()[:80]!r}")
        except OSError:
            names.append(str(pid))
    return ", ".join(names)


def start(argv: list[str], log: Path) -> subprocess.Popen:
    env = dict(
        os.environ,
        VLLM_ENABLE_V1_MULTIPROCESSING="1",
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
        PYTHONPATH=str(REPO),
    )
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "cluster", *argv],
            cwd=REPO,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for_engine(proc: subprocess.Popen, log: Path, timeout_s: float = 240) -> int:
    """Wait until the engine is up (its ready line is logged); returns how many processes the
    command's session has then (the command, the engine core, its workers)."""
    deadline = time.monotonic() + timeout_s
    while ENGINE_READY not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"ended before its engine was up:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "engine not up in time"
        time.sleep(0.5)
    return len(session_pids(proc.pid))


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def commands(tiny_model_dir, tmp_path):
    """Each engine-starting command at the smallest useful size."""
    model = str(tiny_model_dir)
    small = ["generators.kv_cache_gib=0.25", "generators.max_num_batched_tokens=4096"]
    return {
        "bench sampling": [
            "bench", "sampling", "--prompts", "2", f"model.path={model}", "tree.w=4", "tree.d=2", "tree.l=32",
            "tree.max_response_tokens=64", "generators.kv_cache_gib=0.25",
        ],
        "sample": [
            "sample", "--model", model, "--data", "synthetic:arith", "--limit", "2", "--out",
            str(tmp_path / "trees.jsonl"), "--no-progress", "tree.w=4", "tree.d=2", "tree.l=32",
            "tree.max_response_tokens=64", *small,
        ],
        "eval": [
            "eval", "--model", model, "--data", "synthetic:arith", "--max-problems", "2", "--k", "2",
            "--out", str(tmp_path / "eval"), *small,
        ],
        "bench eval": [
            "bench", "eval", "--warmup-problems", "1", "--branching", "2", f"model.path={model}",
            "eval.max_problems=2", "eval.k=4", "tree.d=2", "tree.l=32", "tree.max_response_tokens=64", *small,
        ],
    }  # fmt: skip


@pytest.mark.parametrize("name", ["bench sampling", "sample", "eval", "bench eval"])
def test_engine_processes_end_with_the_command(name, commands, tmp_path):
    argv = commands[name]
    # 1. to completion
    log = tmp_path / "complete.log"
    proc = start(argv, log)
    try:
        wait_for_engine(proc, log)
        rc = proc.wait(timeout=300)
        assert rc == 0, log.read_text()[-3000:]
        left = wait_until_gone(proc.pid, 5)
        assert not left, f"{name}: left running after it completed: {describe(left)}"
    finally:
        kill_session(proc.pid)
    # 2. SIGTERM once the engine is up
    log = tmp_path / "sigterm.log"
    proc = start(argv, log)
    try:
        assert wait_for_engine(proc, log) >= 2  # the engine core runs in a process of its own
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        assert rc != 0, f"{name} ended normally despite SIGTERM"
        left = wait_until_gone(proc.pid, 5)
        assert not left, f"{name}: left running after SIGTERM: {describe(left)}"
    finally:
        kill_session(proc.pid)


def test_engine_stops_when_its_command_is_killed(commands, tmp_path):
    """SIGKILL runs no cleanup in the command: the engine core's watchdog sees its parent gone and
    stops itself and its workers."""
    log = tmp_path / "sigkill.log"
    proc = start(commands["sample"], log)
    try:
        assert wait_for_engine(proc, log) >= 2
        proc.kill()
        proc.wait(timeout=30)
        left = wait_until_gone(proc.pid, 30)
        assert not left, f"left running after the command was killed: {describe(left)}"
    finally:
        kill_session(proc.pid)
