"""The layout rules (CONTRIBUTING.md, "Layout"): the dependency rule, checked on the import statements of every
module, and the rooms' sizes, circles and private names."""

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


def test_the_layout_section_lists_every_room():
    """CONTRIBUTING.md's Layout section: one line per room, and every package folder is one."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    listed = {line.split()[0].rstrip("/") for line in block.splitlines() if line.strip()}
    rooms = {
        str(p.parent.relative_to(ROOT)) for package in PACKAGES for p in (ROOT / package).rglob("__init__.py")
    }
    assert rooms <= listed, f"rooms missing from CONTRIBUTING.md's Layout: {sorted(rooms - listed)}"
    assert all((ROOT / room).is_dir() for room in listed), (
        "CONTRIBUTING.md's Layout names a folder that does not exist"
    )


# ---------------------------------------------------------------------------------------------------
# Rooms with one job each: sizes, import circles, private names


MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 80
MAX_CONTROLLER_LINES = 450  # the controller only composes: supervision, publishing, recovery live apart


def _package_files() -> list[Path]:
    return [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines under ``if TYPE_CHECKING:`` (imports for annotations only: they never run)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                out.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return out


def _imported(path: Path, name: str | None = None) -> list[tuple[int, str, list[str]]]:
    """``(line, module, names)`` of every import of a package module (``name``: its dotted name, by
    default from its path) that runs (any depth, relative imports resolved); ``names`` are the names
    taken from the module by ``from m import a, b``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_lines(tree)
    me = (name or _module_name(path)).split(".")
    here = me if path.name == "__init__.py" else me[:-1]
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            plain = []
            for a in node.names:
                if _is_module(f"{module}.{a.name}"):  # a submodule, not a name of the module
                    out.append((node.lineno, f"{module}.{a.name}", []))
                else:
                    plain.append(a.name)
            if plain:
                out.append((node.lineno, module, plain))
    return [(line, m, names) for line, m, names in out if m.split(".")[0] in PACKAGES]


def _import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in _package_files():
        graph[_module_name(path)] = {m for _l, m, _n in _imported(path) if _is_module(m)}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph``: one per strongly connected component of 2+ modules (or a
    module importing itself), each listed in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    circles = _cycles(_import_graph())
    assert not circles, "modules that import each other (directly or around a circle):\n" + "\n".join(
        " <-> ".join(c) for c in circles
    )


def test_no_module_takes_another_modules_private_names():
    offenders = []
    for path in _package_files():
        me = _module_name(path)
        for line, module, names in _imported(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and module != me:
                offenders.append(f"{path.relative_to(ROOT)}:{line} takes {', '.join(private)} from {module}")
    assert not offenders, "private names imported across modules (make them public or move them):\n" + (
        "\n".join(offenders)
    )


def test_module_sizes():
    over = {
        str(p.relative_to(ROOT)): n
        for p in _package_files()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {over}"
    controller = len((ROOT / "cluster" / "pipeline" / "controller.py").read_text().splitlines())
    assert controller <= MAX_CONTROLLER_LINES, f"cluster/pipeline/controller.py has {controller} lines"


def test_function_sizes():
    over = []
    for path in _package_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    over.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(over)


def test_the_room_checks_catch_what_they_look_for(tmp_path):
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}, "b": set()}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    probe = tmp_path / "probe.py"
    probe.write_text("from common.replay import _x, y\nfrom .keys import _k\nfrom common import keys\n")
    got = _imported(probe, "common.probe")  # as if it were a module of common/
    assert (1, "common.replay", ["_x", "y"]) in got
    assert (2, "common.keys", ["_k"]) in got
    assert (3, "common.keys", []) in got
