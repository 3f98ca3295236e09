"""``treepo train driver=ray`` stopped by a signal once it trains, as a job scheduler or ``timeout``
(SIGTERM) or a person at the terminal (SIGINT) stops it: sent to the whole process group, twice. The
exit status says so (143, 130; not the SIGABRT, 134, that Ray's C++ failure handler turns a slow
cleanup into, nor Ray's exit after a minute without the GCS that the group signal stopped), and the
cleanup is complete: the embedded redis-server, Ray's processes, the actors and their engines are
gone, and the queue password file handed to the generators is removed from the run directory. After
SIGTERM and after SIGKILL (which cleans up nothing), ``--resume`` trains every prompt of the epoch
exactly once; the SIGKILL case runs with tools (a model that calls the calculator: tool calls end
segments and their results are observation tokens in the trees that cross the kill).

The command runs in a child process with a Ray temp directory of its own (``RAY_TMPDIR``), so every
process of its Ray is found by that path on its command line, besides the descendants it had when
the signal was sent."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from paths import REPO
from pipeline_runs import audit_rows, trained_prompts
from ray_nodes import small_pipeline_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FIRST_STEP_TIMEOUT_S = 300.0


def _processes() -> dict[int, tuple[int, str, str]]:
    """Every process: pid -> (parent pid, start time, state)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(d.name)] = (int(fields[1]), fields[19], fields[0])
    return out


def _descendants(root: int) -> dict[int, str]:
    """The live descendants of ``root``: pid -> start time (so a reused pid is not mistaken)."""
    procs = _processes()
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start, _state) in procs.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def _marked(marker: str) -> dict[int, str]:
    """Processes with ``marker`` on their command line: pid -> start time."""
    procs, out = _processes(), {}
    for pid, (_ppid, start, _state) in procs.items():
        with contextlib.suppress(OSError):
            if pid != os.getpid() and marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                out[pid] = start
    return out


def _alive(pids: dict[int, str]) -> dict[int, str]:
    """The processes of ``pids`` still running (zombies count as gone), with their command lines."""
    procs, out = _processes(), {}
    for pid, start in pids.items():
        info = procs.get(pid)
        if info is not None and info[1] == start and info[2] != "Z":
            with contextlib.suppress(OSError):
                out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
    return out


def _wait_gone(pids: dict[int, str], timeout_s: float) -> dict[int, str]:
    deadline = time.monotonic() + timeout_s
    while (left := _alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _resume_to_the_end(argv: list[str], env: dict, run: Path, tmp_path: Path, tools: bool = False) -> None:
    """``--resume`` of the stopped run until the data runs out: every prompt of the epoch trained
    exactly once (dynamic sampling is off, so none may end untrained), counted from the audit trail;
    the resumed run stops its embedded Redis (the killed run's, adopted) and removes its password file."""
    log = tmp_path / "resume.log"
    with open(log, "wb") as out:
        rc = subprocess.run(
            [*argv, "--resume"], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=400
        ).returncode
    console = log.read_text(errors="replace")
    assert rc == 0, f"the resume exited {rc}:\n{console[-4000:]}"
    assert "resumed from step" in console, console[-2000:]
    prompts = trained_prompts(audit_rows(run))
    assert len(prompts) == len(set(prompts)) == 12, f"prompts trained: {sorted(prompts)}"
    assert (
        not (run / "redis" / "endpoint.json").exists() and not (run / "secrets" / "queue_password").exists()
    )
    if tools:  # the trained trees held tool calls and their results
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        calls = sum(r.get("tree/tool_calls", 0) for r in rows)
        observed = sum(r.get("tree/observation_tokens", 0) for r in rows)
        assert calls > 0 and observed > 0, f"no tool call in {len(rows)} steps"


@pytest.mark.parametrize(
    "signum, status, resume",
    [(signal.SIGTERM, 143, True), (signal.SIGINT, 130, False), (signal.SIGKILL, -9, True)],
    ids=["SIGTERM+resume", "SIGINT", "SIGKILL+resume+tools"],
)
def test_a_signal_after_the_first_step_ends_cleanly(tmp_path, request, signum, status, resume):
    pytest.importorskip("vllm")
    tools = signum == signal.SIGKILL
    model = request.getfixturevalue("tool_model_dir" if tools else "tiny_model_dir")
    with_tools = ["tools=[calc=calculator]", "data.train=synthetic:calc"] if tools else []
    run = tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="rsig", dir="/tmp")  # short: Ray's unix sockets live below it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_TMPDIR"] = ray_tmp
    argv = [
        sys.executable,
        "-m",
        "cluster",
        "train",
        # 12 prompts, 2 a step, a checkpoint every step: a resume trains the rest to the end of the data
        *small_pipeline_overrides(
            run,
            model,
            "learner.total_steps=100",
            "checkpoint.every_steps=1",
            "data.synthetic_train_size=12",
            *with_tools,
        ),
    ]
    log = tmp_path / "console.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
    tree: dict[int, str] = {}
    try:
        deadline = time.monotonic() + FIRST_STEP_TIMEOUT_S
        metrics = run / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"no step in {FIRST_STEP_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}"
            )
            time.sleep(0.5)
        tree = {**_descendants(proc.pid), **_marked(ray_tmp)}
        assert any("redis-server" in c for c in _alive(tree).values()), "no embedded redis-server found"
        assert (run / "secrets" / "queue_password").exists()
        t0 = time.monotonic()
        # to the whole process group, as ``timeout``, ``kill -- -PGID`` or Ctrl-C send it (Ray's own
        # processes get it too), and a second time while the driver stops (a scheduler's repeat)
        os.killpg(proc.pid, signum)
        time.sleep(0.5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)
        rc = proc.wait(timeout=180)
        took = time.monotonic() - t0
        console = log.read_text(errors="replace")
        assert rc == status, f"exit status {rc} after {signum.name}:\n{console[-4000:]}"
        if signum == signal.SIGKILL:  # nothing cleans up; nothing may be lost either
            _resume_to_the_end(argv, env, run, tmp_path, tools)
            return
        assert "SIGTERM received" not in console and "Traceback" not in console, console[-4000:]
        # well inside the minute after which Ray's core worker ends a driver that lost its GCS
        assert took < 40, f"{took:.0f} s to stop:\n{console[-4000:]}"
        left = _wait_gone({**tree, **_marked(ray_tmp)}, 15.0)
        assert not left, f"left running after {signum.name}: {left}"
        assert not (run / "secrets" / "queue_password").exists(), "the queue password file was left behind"
        assert not (run / "redis" / "endpoint.json").exists(), "the embedded Redis was not stopped cleanly"
        print(f"[timing] {signum.name}: exit {rc} in {took:.1f} s")
        if resume:
            _resume_to_the_end(argv, env, run, tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for pid in _alive({**tree, **_marked(ray_tmp)}):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
