"""A refused ``treepo train`` leaves the run directory byte for byte as it was, or absent if it was:
each refusal is made before anything is written or started, with both drivers. The cases: a run
directory holding checkpoints without ``--resume``, ``--resume`` where there is no checkpoint (the
directory absent, or present without one), a ``model.path`` that does not exist, a resume that
changes a key defining the run's trees (``tree.w``), a tool spec that does not resolve, and with
``driver=ray`` one whose checkpoint belongs to another run directory.

The command line runs in-process; every file of the run directory is hashed before and after."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from ray_nodes import small_pipeline_overrides

from cluster.cli import main
from cluster.pipeline.recovery import config_snapshot
from common.config import load_config, save_resolved
from common.keys import run_name_for
from learner import checkpoint as ckpt

pytestmark = pytest.mark.integration


def _files(run) -> dict[str, str] | None:
    """Every entry under ``run``: relative path -> sha256 of a file's bytes ('dir' for a folder)."""
    if not run.exists():
        return None
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(run.rglob("*"))
    }


def _first_run(run, overrides: list[str], owner: str | None = None) -> None:
    """What a first run left: its config.yaml and one published checkpoint (only trainer.json, enough
    for every check) whose extra holds the first run's config and owner."""
    cfg = load_config(None, overrides)
    save_resolved(cfg, run)
    extra = {
        "step": 2,
        "cursor": None,
        "prompts": {"cursor": {"claimed": 4}},
        "stream": {"run": owner or run_name_for(run)},
        "config": config_snapshot(cfg),
    }
    tmp = ckpt.begin(run / "checkpoints", 2)
    (tmp / ckpt.TRAINER).write_text(json.dumps({"step": 2, "version": 2, "extra": extra}))
    ckpt.publish(run / "checkpoints", tmp, 2, keep_last=5)


CASES = {
    # name: (drivers, what the first run left ("" nothing, "config" config.yaml only, "ckpt" a
    # checkpoint), extra arguments, the error's pattern)
    "existing run without --resume": (("local", "ray"), "ckpt", [], r"already holds checkpoints"),
    "--resume, no directory": (("local", "ray"), "", ["--resume"], r"holds no checkpoint"),
    "--resume, no checkpoint": (("local", "ray"), "config", ["--resume"], r"holds no checkpoint"),
    "missing model.path": (("local", "ray"), "", ["model.path=/nonexistent/model"], r"does not exist"),
    "--resume changing tree.w": (
        ("local", "ray"),
        "ckpt",
        ["--resume", "tree.w=8"],
        r"resume changes tree\.w: 4 -> 8",
    ),
    "--resume of a moved run": (("ray",), "moved", ["--resume"], r"belongs to run 'elsewhere-0123abcd'"),
    "a tool that does not resolve": (
        ("local", "ray"),
        "",
        ["tools=[calc=calculator,missing_tools.py:lookup]"],
        r"tool 'missing_tools\.py:lookup': file .*missing_tools\.py does not exist",
    ),
}


@pytest.mark.parametrize("driver", ["local", "ray"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_refused_run_leaves_its_directory_as_it_was(tmp_path, tiny_model_dir, capsys, case, driver):
    drivers, left, extra, pattern = CASES[case]
    if driver not in drivers:
        pytest.skip(f"{driver} has no such refusal")
    run = tmp_path / "run"
    overrides = small_pipeline_overrides(run, tiny_model_dir, f"driver={driver}")
    if left == "config":
        save_resolved(load_config(None, overrides), run)
    elif left in ("ckpt", "moved"):
        _first_run(run, overrides, owner="elsewhere-0123abcd" if left == "moved" else None)
    before = _files(run)
    assert main(["train", *overrides, *extra]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("treepo train: error:"), err
    assert re.search(pattern, lines[0]), lines[0]
    assert _files(run) == before, f"{case} ({driver}) changed the run directory"
