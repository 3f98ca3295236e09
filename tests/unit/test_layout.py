"""The dependency rule of DESIGN.md, checked on the import statements of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "actors", "learner", "cluster")
ALLOWED = {
    "common": {"common"},
    "actors": {"common", "actors"},
    "learner": {"common", "learner"},
    "cluster": set(PACKAGES),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_dependency_rule(package):
    violations = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, top in _imports(path):
            if top in PACKAGES and top not in ALLOWED[package]:
                violations.append(f"{path.relative_to(ROOT)}:{line} imports {top}")
    assert not violations, "dependency rule broken:\n" + "\n".join(violations)


def test_ray_remote_only_in_cluster():
    offenders = []
    for package in ("common", "actors", "learner"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            if "ray.remote" in text or "@remote" in text:
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"ray.remote outside cluster/: {offenders}"


def test_no_pickle_in_project_code():
    offenders = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for _line, top in _imports(path):
                if top in ("pickle", "cloudpickle", "dill"):
                    offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"pickle imported in {offenders}: use msgpack/safetensors with validation"


def test_the_rule_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("import os\nfrom learner.loss import x\nimport cluster.cli\n")
    assert [t for _l, t in _imports(bad)] == ["os", "learner", "cluster"]
