"""The generated reference pages match the code (docs/configuration.md from the config dataclasses,
docs/metrics.md from common/metric_keys.py), and every metric key the training code names is in the
registry the metrics page comes from."""

from __future__ import annotations

import ast
import importlib.util
import re

import pytest
from paths import REPO

from common.config import help_table
from common.metric_keys import METRICS, NAMESPACES, documented_as, namespace, undocumented


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _gen_docs()


@pytest.mark.parametrize("page", sorted(gen.PAGES))
def test_generated_page_is_current(page):
    path = REPO / page
    assert path.exists(), f"{page} is missing: run `{gen.REFRESH}`"
    assert path.read_text() == gen.PAGES[page](), f"{page} is stale: run `{gen.REFRESH}` and commit it"


def test_configuration_page_lists_every_key_of_help_config():
    text = (REPO / "docs" / "configuration.md").read_text()
    listed = re.findall(r"^\| `([a-z0-9_.]+)` \|", text, re.M)
    assert sorted(listed) == sorted(key for key, _, _ in help_table())


def test_a_changed_source_makes_the_page_stale(monkeypatch):
    monkeypatch.setitem(METRICS, "rollout/new_key", "A key added to the code.")
    assert "docs/metrics.md" in gen.stale_pages()


# Where a training run's metrics are made; benches and `treepo sample` print their own summaries.
SOURCES = ["common", "actors", "learner", "cluster"]
NOT_TRAINING = ("cluster/bench/", "cluster/commands/sample.py", "common/metric_keys.py")
_NS = "|".join(re.escape(n) for n in NAMESPACES if n)
KEY = re.compile(rf"^(?:{_NS})[a-z0-9_]+(?:/[^\s/]+)*$")


def _literal(node: ast.AST) -> str | None:
    """A string constant, or an f-string with each replacement field as ``<x>``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "<x>" for v in node.values)
    return None


def source_keys() -> dict[str, str]:
    """Metric-looking strings in the training code: key -> where."""
    found = {}
    for package in SOURCES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel.startswith(NOT_TRAINING):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                text = _literal(node)
                if text and KEY.match(text.replace("<x>", "x")) and not text.endswith("/"):
                    found.setdefault(text, f"{rel}:{node.lineno}")
    return found


def _documented(key: str) -> bool:
    if "<x>" not in key:
        return documented_as(key) is not None
    head = key.split("<x>", 1)[0]  # f"generator/{k}": some key of that family is documented
    return any(k.startswith(head) for k in METRICS)


def test_every_metric_key_named_in_the_training_code_is_documented():
    keys = source_keys()
    assert len(keys) > 60, "the scan found too few keys: has the metrics code moved?"
    missing = [f"{k} ({where})" for k, where in sorted(keys.items()) if not _documented(k)]
    listing = "\n".join(missing)
    assert not missing, f"add these keys to common/metric_keys.py, then run `{gen.REFRESH}`:\n{listing}"


def test_registry_patterns():
    assert documented_as("tree/leaf_depth/3") == "tree/leaf_depth/<depth>"
    assert documented_as("eval/maj@16") == "eval/maj@<k>"
    assert documented_as("staleness/hist/12") == "staleness/hist/<versions>"
    assert undocumented({"step", "rollout/reward", "rollout/nothing", "tree/finish/eos"}) == [
        "rollout/nothing"
    ]
    assert all(namespace(k) in NAMESPACES for k in METRICS)
