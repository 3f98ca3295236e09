"""The CLI: --help everywhere, --print-config, one-line errors and non-zero exits on bad overrides."""

from __future__ import annotations

import subprocess
import sys

import pytest
from paths import REPO

from cluster.cli import COMMANDS, main
from cluster.commands.bench import BENCHES


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster", *args], capture_output=True, text=True, timeout=120
    )


def test_help_everywhere(capsys):
    for cmd in [[], *[[c] for c in COMMANDS], *[["bench", b] for b in BENCHES]]:
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_print_config_prints_the_resolved_demo():
    r = _run("train", "--print-config")
    assert r.returncode == 0, r.stderr
    assert "tree:" in r.stdout and "w: 8" in r.stdout and "path: tiny:arith" in r.stdout
    r2 = _run("train", "--print-config", "tree.w=16", "--config", "demo")
    assert "w: 16" in r2.stdout


@pytest.mark.parametrize("override, key", [("tree.w=abc", "tree.w"), ("no.such.key=1", "no.such.key")])
def test_bad_override_exits_nonzero_with_one_line(override, key):
    r = _run("train", override)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert key.split(".")[0] in lines[0] and "error" in lines[0]


def test_help_config_lists_keys(capsys):
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "tree.w = 8" in out and "learner.lr" in out


def test_console_script_is_declared():

    text = (REPO / "pyproject.toml").read_text()
    assert 'treepo = "cluster.cli:main"' in text


def test_overrides_on_both_sides_of_flags(capsys):
    """`x=1 --resume y=2` keeps both overrides (argparse alone rejects the second)."""
    assert main(["train", "learner.total_steps=5", "--resume", "tree.w=16", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "resume: true" in out and "w: 16" in out and "total_steps: 5" in out
    with pytest.raises(SystemExit) as e:
        main(["train", "--print-config", "--bogus"])
    assert e.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
