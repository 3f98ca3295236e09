"""The dependency rule of DESIGN.md, checked on the import statements of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from paths import REPO

ROOT = REPO
PACKAGES = ("common", "actors", "learner", "cluster")
ALLOWED = {
    "common": {"common"},
    "actors": {"common", "actors"},
    "learner": {"common", "learner"},
    "cluster": set(PACKAGES),
}


def _modules(path: Path) -> list[tuple[int, str]]:
    """Every absolute import of a file as ``(line, dotted module)`` (``from a.b import c``: ``a.b.c``
    and ``a.b``, since ``c`` may be a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    seen, out = set(), []
    for line, module in _modules(path):
        if (line, module.split(".")[0]) not in seen:
            seen.add((line, module.split(".")[0]))
            out.append((line, module.split(".")[0]))
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_dependency_rule(package):
    violations = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, top in _imports(path):
            if top in PACKAGES and top not in ALLOWED[package]:
                violations.append(f"{path.relative_to(ROOT)}:{line} imports {top}")
    assert not violations, "dependency rule broken:\n" + "\n".join(violations)


TOPOLOGY = "cluster/pipeline/topology.py"


def _applies_remote(path: Path) -> bool:
    """Code (not prose) that names ``ray.remote``, a ``remote`` decorator or calls ``.options(...)``."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        is_attr = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        if is_attr and node.attr == "remote" and node.value.id == "ray":
            return True
        if isinstance(node, ast.Name) and node.id == "remote":
            return True
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "options"
        ):
            return True
    return False


def test_ray_remote_and_options_only_in_the_topology():
    offenders = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            if rel != TOPOLOGY and _applies_remote(path):
                offenders.append(rel)
    assert not offenders, f"ray.remote / .options outside {TOPOLOGY}: {offenders}"


def _importers(prefix: str) -> dict[str, list[str]]:
    """Modules of the four packages (as paths) that import ``prefix`` or a module below it."""
    out: dict[str, list[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            hits = [m for _l, m in _modules(path) if m == prefix or m.startswith(prefix + ".")]
            if hits:
                out[str(path.relative_to(ROOT))] = hits
    return out


def test_only_the_train_command_imports_the_local_driver():
    assert set(_importers("cluster.local")) <= {"cluster/commands/train.py"}


def test_nothing_but_the_cli_imports_a_command():
    # the commands are loaded by name (importlib) from cluster/cli.py; pipeline and benchmarks compose
    # only the pipeline, the drivers' shared modules and the three lower packages
    assert set(_importers("cluster.commands")) <= {"cluster/cli.py"}


def test_the_pipeline_imports_no_benchmark():
    assert not [p for p in _importers("cluster.bench") if p.startswith("cluster/pipeline/")]


def test_config_imports_no_heavy_dependency():
    heavy = {"torch", "ray", "vllm", "redis"}
    paths = [*sorted((ROOT / "common" / "config").glob("*.py")), ROOT / "common" / "schedule.py"]
    assert len(paths) > 2
    for path in paths:
        assert not {m.split(".")[0] for _l, m in _modules(path)} & heavy, path


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


def test_the_readme_layout_lists_every_room():
    """README's Layout section: one line per room, and every package folder is one."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    listed = {line.split()[0].rstrip("/") for line in block.splitlines() if line.strip()}
    rooms = {
        str(p.parent.relative_to(ROOT)) for package in PACKAGES for p in (ROOT / package).rglob("__init__.py")
    }
    assert rooms <= listed, f"rooms missing from README's Layout: {sorted(rooms - listed)}"
    assert all((ROOT / room).is_dir() for room in listed), (
        "README's Layout names a folder that does not exist"
    )
