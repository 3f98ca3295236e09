"""A pipeline run driven from a test: started in a thread, watched through its run directory, and read
back (the audit trail ``trained_trees.jsonl`` and ``metrics.jsonl``). Shared by the pipeline, chaos
and FSDP pipeline tests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def audit_rows(run_dir: Path) -> list[dict]:
    """``trained_trees.jsonl``: one row per trained step (step, version, tree ids)."""
    return [json.loads(line) for line in (run_dir / "trained_trees.jsonl").read_text().splitlines()]


def metrics_rows(run_dir: Path) -> list[dict]:
    """``metrics.jsonl``: one row per step (an evaluation's own row merged into its step's)."""
    from common.metrics import by_step

    return by_step([json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()])


def trained_prompts(rows: list[dict]) -> list[str]:
    """The prompt id of every tree the rows trained (tree ids are ``<prompt>@e<epoch>``), in order."""
    return [t.split("@")[0] for r in rows for t in r["trees"]]


def assert_queue_drained(run_dir: Path, server: Any, n_prompts: int) -> None:
    """The end of an epoch as Redis holds it: every prompt handed out, none waiting for re-issue or in
    flight, no tree left untrained (pending or undelivered) in the queue."""
    from common.keys import RunKeys, run_name_for
    from common.replay import ReplayQueue

    keys = RunKeys(run_name_for(run_dir))
    q = ReplayQueue(server.url, keys.run, password=server.password)
    try:
        assert int(q.redis.get(keys.prompts_cursor)) == n_prompts
        assert q.redis.llen(keys.prompts_retry) == 0
        assert not [k for k in q.redis.scan_iter(match=keys.prompts_inflight("*")) if q.redis.hlen(k)]
        assert q.pending() == [] and q.undelivered() == 0
    finally:
        q.close()


def run_in_thread(run_pipeline: Callable[[Any], int], cfg: Any) -> tuple[threading.Thread, dict]:
    """Start ``run_pipeline(cfg)`` in a daemon thread; ``result`` gets ``rc`` or the ``error`` the
    test re-raises (:func:`finish`)."""
    result: dict = {}

    def target():
        try:
            result["rc"] = run_pipeline(cfg)
        except BaseException as e:  # re-raised or inspected by the test
            result["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    return th, result


def wait_for_step(run_dir: Path, step: int, th: threading.Thread, timeout_s: float = 240) -> None:
    """Until the audit trail holds ``step`` rows; fails if the run ends first or time runs out."""
    deadline = time.time() + timeout_s
    path = run_dir / "trained_trees.jsonl"
    while time.time() < deadline and th.is_alive():
        if path.exists() and len(path.read_text().splitlines()) >= step:
            return
        time.sleep(0.3)
    assert th.is_alive(), "the pipeline ended early"
    raise AssertionError(f"step {step} not reached in {timeout_s} s")


def finish(th: threading.Thread, result: dict, timeout_s: float = 300, after: str = "") -> None:
    """Join the run's thread; re-raise its error; its exit code must be 0."""
    th.join(timeout=timeout_s)
    assert not th.is_alive(), f"the pipeline did not finish{' after ' + after if after else ''}"
    if "error" in result:
        raise result["error"]
    assert result["rc"] == 0
