"""Every `treepo` command line and every config key that README.md and docs/*.md name exists.

Extraction rules (small on purpose, so a reader can predict what is checked):

- commands: in inline code and fenced code blocks, ``treepo WORD`` or ``python -m cluster WORD``
  (after the start, a space, a backtick or a parenthesis); WORD must be a subcommand of the CLI
  parser, and for ``bench`` / ``queue`` the next word (when it is a plain word) one of theirs; every
  ``--option`` after it on the same command (up to a ``|``, ``;``, ``&&``, ``#`` or the end of the code)
  must be an option of that (sub)command;
- config keys: anywhere, ``section.key=`` (a dotted key followed by ``=``), and inline code that is
  exactly a dotted key (``section.key``), where ``section`` is a top-level config section. It must be
  a key of the schema (a leaf, a section, or a name inside a mapping such as ``ray_resources``), or
  one of the removed keys the config loader refuses with a pointer to their replacement;
- metric keys: inline code that is exactly a metric key (``rollout/reward``, ``tree/leaf_depth/<k>``)
  must be in common/metric_keys.py (MLflow's spelling ``eval/mean_at_4`` counts as ``eval/mean@4``);
- files: in code, a path under one of the repository's top folders (``cluster/head_redis.sh``) that
  is not a metric key and has no placeholder (``<``, ``*``) must exist.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest
from paths import REPO

from cluster.cli import build_parser
from common.config import ConfigError, TrainConfig, help_table, load_config
from common.metric_keys import NAMESPACES, documented_as

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# removed keys that pages may name as refused (checked below to be refused)
REFUSED = {"tree.answer_tail_chars", "log.wandb_project", "log.tensorboard"}
SECTIONS = [
    f.name
    for f in dataclasses.fields(TrainConfig)
    if dataclasses.is_dataclass(getattr(TrainConfig(), f.name))
]
STOP = {"|", ";", "&&", "||", ">", ">>"}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


COMMANDS = _subparsers(build_parser())


def code_snippets(text: str) -> list[str]:
    """Fenced code blocks' lines (continuations joined) and inline code spans."""
    out, fenced = [], False
    for line in text.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            out.append(line)
        else:
            out += re.findall(r"`([^`\n]+)`", line)
    return out


COMMAND = re.compile(r"(?:^|[\s`(])(?:treepo|python -m cluster)\s+([a-z][a-z-]*)(.*)$")


def command_problems(snippet: str) -> list[str]:
    m = COMMAND.search(snippet)
    if not m:
        return []
    name, rest = m.group(1), m.group(2).split()
    if name not in COMMANDS:
        return [f"`treepo {name}`: no such command (treepo --help)"]
    parser, shown = COMMANDS[name], f"treepo {name}"
    subs = _subparsers(parser)
    if subs and rest and re.fullmatch(r"[a-z][a-z-]*", rest[0]):
        if rest[0] not in subs:
            return [f"`{shown} {rest[0]}`: no such subcommand ({shown} --help)"]
        parser, shown, rest = subs[rest[0]], f"{shown} {rest[0]}", rest[1:]
    problems = []
    for token in rest:
        if token in STOP or token.startswith("#"):
            break
        opt = re.match(r"\[?(--[a-z][a-z0-9-]*)", token)
        if opt and opt.group(1) not in parser._option_string_actions:
            problems.append(f"`{shown} {opt.group(1)}`: no such option ({shown} --help)")
    return problems


def _known_keys() -> tuple[set[str], set[str]]:
    leaves = {key for key, _, _ in help_table()}
    sections = {".".join(k.split(".")[:i]) for k in leaves for i in range(1, k.count(".") + 1)}
    mappings = {k for k in leaves if isinstance(_default_of(k), dict)}
    return leaves | sections, mappings


def _default_of(key: str):
    obj = TrainConfig()
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


KNOWN, MAPPINGS = _known_keys()
_SEC = "|".join(SECTIONS)
KEY_ASSIGN = re.compile(rf"(?<![\w./$-])((?:{_SEC})(?:\.[a-z_][a-z0-9_]*)+)=")
KEY_SPAN = re.compile(rf"(?:{_SEC})(?:\.[a-z_][a-z0-9_]*)+")


FILE_SUFFIXES = {"py", "md", "png", "yaml", "yml", "json", "jsonl", "html", "sh", "txt", "parquet", "arrow"}


def is_key_span(span: str) -> bool:
    """Inline code that is exactly a dotted key (not a file name such as ``tree.py``)."""
    return bool(KEY_SPAN.fullmatch(span)) and span.rsplit(".", 1)[1] not in FILE_SUFFIXES


def key_exists(key: str) -> bool:
    if key in KNOWN or key in REFUSED:
        return True
    return any(key.startswith(m + ".") for m in MAPPINGS)  # generators.ray_resources.generator_node


def page_problems(path: Path) -> list[str]:
    text = path.read_text()
    problems = [p for s in code_snippets(text) for p in command_problems(s)]
    keys = set(KEY_ASSIGN.findall(text))
    keys |= {s for s in re.findall(r"`([^`\n]+)`", text) if is_key_span(s)}
    problems += [
        f"`{k}`: no such config key (treepo train --help-config)" for k in sorted(keys) if not key_exists(k)
    ]
    return problems


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_command_and_key_named_exists(path):
    problems = page_problems(path)
    assert not problems, f"{path.relative_to(REPO)}:\n" + "\n".join(problems)


def test_the_refused_keys_are_refused():
    for key in REFUSED:
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(None, [f"{key}=1"])


def test_the_rules_catch_wrong_names():
    assert command_problems("treepo trian --config x") == ["`treepo trian`: no such command (treepo --help)"]
    assert command_problems("treepo bench sampling --prompts 4 --shape 4x64")[0].startswith(
        "`treepo bench sampling --shape`"
    )
    assert command_problems("treepo bench sampler")[0].startswith("`treepo bench sampler`")
    assert (
        command_problems("bash cluster/head_redis.sh exec python -m cluster train --config c.yaml --resume")
        == []
    )
    assert command_problems("treepo plan --json | grep verdict --color") == []
    assert not key_exists("learner.lr_max") and key_exists("learner.lora.rank") and key_exists("learner.lora")
    assert key_exists("generators.ray_resources.generator_node")
    assert KEY_ASSIGN.findall("x tree.w=8 and /mnt/tree.w=1 `algo.clip_low` y") == ["tree.w"]
    assert [s for s in ("algo.clip_lo", "tree.py", "`x`") if is_key_span(s)] == ["algo.clip_lo"]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(path):
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())
    local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    missing = [t for t in local if not (path.parent / t).exists()]
    assert not missing, f"{path.relative_to(REPO)} links to missing files: {missing}"


_NS = "|".join(re.escape(n) for n in NAMESPACES if n)
METRIC_SPAN = re.compile(rf"(?:{_NS})[a-z0-9_]+(?:/[^\s/`]+)*")
REPO_PATH = re.compile(
    r"(?:^|[\s`(])((?:cluster|scripts|configs|docs|tests|common|actors|learner)/[A-Za-z0-9_./-]*)"
)


def metric_problems(text: str) -> list[str]:
    spans = [s for s in re.findall(r"`([^`\n]+)`", text) if METRIC_SPAN.fullmatch(s)]
    return [
        f"`{s}`: no such metric key (common/metric_keys.py)"
        for s in spans
        if not documented_as(s.replace("_at_", "@")) and not documented_as(re.sub(r"<[a-z_]+>", "0", s))
    ]


def path_problems(text: str) -> list[str]:
    paths = {m.rstrip(".,:") for snippet in code_snippets(text) for m in REPO_PATH.findall(snippet)}
    return [
        f"`{p}`: no such file or folder"
        for p in sorted(paths)
        if not any(c in p for c in "<*") and not documented_as(p) and not (REPO / p).exists()
    ]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_metric_and_file_named_exists(path):
    text = path.read_text()
    problems = metric_problems(text) + path_problems(text)
    assert not problems, f"{path.relative_to(REPO)}:\n" + "\n".join(problems)


def test_the_metric_and_file_rules_catch_wrong_names():
    assert metric_problems("`rollout/reward`, `tree/leaf_depth/<k>`, `eval/mean_at_4`, `eval/`") == []
    assert metric_problems("`rollout/rewards`") == [
        "`rollout/rewards`: no such metric key (common/metric_keys.py)"
    ]
    assert path_problems("`bash cluster/head_redis.sh start` and `learner/idle_frac`") == []
    assert path_problems("`bash cluster/head_redis.py start`") == [
        "`cluster/head_redis.py`: no such file or folder"
    ]
