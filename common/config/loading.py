"""Loading: defaults <- preset YAML <- ``key=value`` overrides, strictly typed, then validated.

Unknown keys fail naming the whole dotted key (with a close match when there is one), removed keys
name what replaced them, wrong types name the type expected. Also: the resolved config as YAML (and
back), written atomically into the run directory, and the ``--help-config`` table.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from common.config.schema import TrainConfig
from common.config.validation import validate
from common.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs"


def _resolve_preset(name: str) -> Path:
    path = Path(name)
    if path.exists():
        return path
    for candidate in (PRESET_DIR / name, PRESET_DIR / f"{name}.yaml"):
        if candidate.exists():
            return candidate
    presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))) or "none"
    raise ConfigError(f"config file {name!r} not found: pass a YAML path or a preset name ({presets})")


def _one_line(exc: OmegaConfBaseException) -> tuple[str, str]:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return key, msg


def _schema_field(key: str) -> Any:
    """The type annotation of a dotted key, or None if the key does not exist."""
    cls: Any = TrainConfig
    hint: Any = None
    for part in key.split("."):
        if typing.get_origin(cls) is dict:  # free-form mapping (e.g. ray_resources): any key, value type
            hint = cls = typing.get_args(cls)[1]
            continue
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        hint = cls = hints[part]
    return hint


def _suggest(key: str) -> str:
    parent, _, leaf = key.rpartition(".")
    cls = _schema_field(parent) if parent else TrainConfig
    names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    close = difflib.get_close_matches(leaf, names, n=1)
    return f"did you mean {(parent + '.' if parent else '') + close[0]!r}? " if close else ""


# key -> what replaced it: a removed key fails with this, never silently mapped onto its replacement
_REPLACED: dict[str, str] = {
    "tree.answer_tail_chars": "the answer is now looked for in the last segment plus "
    "tree.answer_overlap_tokens tokens before it (default 64); remove tree.answer_tail_chars",
    "log.tensorboard": "trackers are listed in log.backends (default [tensorboard]); "
    "set log.backends=[] for metrics.jsonl only",
    "log.wandb_project": "W&B is turned on by log.backends=[wandb] and its project is log.wandb.project",
}


def _check_keys(node: Any, prefix: str, origin: str) -> None:
    """Reject unknown keys naming the full dotted key (OmegaConf only names the first unknown part)."""
    if not isinstance(node, DictConfig):
        return
    for k in node:
        key = f"{prefix}{k}"
        if key in _REPLACED:
            raise ConfigError(f"{key} (in {origin}) was removed: {_REPLACED[key]}")
        hint = _schema_field(key)
        if hint is None:
            value = node._get_node(k)
            while isinstance(value, DictConfig) and len(value):  # name the whole key the user wrote
                first = next(iter(value.keys()))
                key, value = f"{key}.{first}", value._get_node(first)
            raise ConfigError(
                f"unknown key {key!r} in {origin}: {_suggest(key)}remove it or fix the spelling "
                "(treepo train --help-config lists every key)"
            )
        if dataclasses.is_dataclass(hint):
            if not isinstance(node._get_node(k), DictConfig):
                raise ConfigError(
                    f"{key} is a section, not a value (in {origin}): set its keys, e.g. {key}.<name>=..."
                )
            _check_keys(node[k], key + ".", origin)


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}


def _merge(base: DictConfig, other: DictConfig, origin: str) -> DictConfig:
    _check_keys(other, "", origin)
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except ConfigKeyError as e:
        key, _ = _one_line(e)
        raise ConfigError(f"unknown key {key!r} in {origin}: remove it or fix the spelling") from None
    except ValidationError as e:
        key, msg = _one_line(e)
        expected = _TYPE_WORDS.get(_schema_field(key), "a value of the right type")
        raise ConfigError(f"{key}: wrong type in {origin} ({msg}); set {key} to {expected}") from None
    except OmegaConfBaseException as e:
        key, msg = _one_line(e)
        raise ConfigError(f"{key}: {msg} (in {origin})") from None


def parse_overrides(overrides: list[str]) -> DictConfig:
    """``key=value`` items as a config. Hydra's ``+key=value`` / ``++key=value`` are taken as
    ``key=value``: every key exists in the schema already, and an unknown one is refused by name."""
    overrides = [item.lstrip("+") if item.startswith("+") else item for item in overrides]
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not key=value: write e.g. tree.w=16")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {str(e).splitlines()[0]}") from None


MAPPINGS = ("generators", "learner")  # the sections whose ray_resources is a free-form mapping


def _schema() -> DictConfig:
    """The defaults as a struct-mode config (unknown keys fail) with free-form mappings left open."""
    base = OmegaConf.structured(TrainConfig)
    OmegaConf.set_struct(base, True)
    for section in MAPPINGS:  # ray_resources: the keys are the user's resource names
        OmegaConf.set_struct(base[section].ray_resources, False)
    return base


def _clear_given_mappings(base: DictConfig, given: DictConfig) -> None:
    """A free-form mapping given on the command line replaces the preset's instead of merging into it:
    ``generators.ray_resources={}`` clears a preset's ``{generator_node: 1}``."""
    for section in MAPPINGS:
        if OmegaConf.select(given, f"{section}.ray_resources") is not None:
            base[section].ray_resources = {}
            OmegaConf.set_struct(base[section].ray_resources, False)


def load_config(
    config: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """Defaults <- preset YAML <- ``key=value`` overrides, strictly typed and validated."""
    base = _schema()
    if config:
        path = _resolve_preset(str(config))
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml syntax errors come in many types
            raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}; fix the YAML syntax") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path} must hold a mapping of sections (model:, tree:, ...), not a list")
        base = _merge(base, loaded, str(path))
    if overrides:
        given = parse_overrides(list(overrides))
        _clear_given_mappings(base, given)
        base = _merge(base, given, "command-line overrides")
    try:
        cfg: TrainConfig = OmegaConf.to_object(base)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key, msg = _one_line(e)
        raise ConfigError(f"{key}: {msg}") from None
    validate(cfg)
    return cfg


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml_text(text: str) -> TrainConfig:
    """Inverse of :func:`to_yaml` (used for the config saved in a run directory)."""
    base = _schema()
    cfg = OmegaConf.to_object(_merge(base, OmegaConf.create(text), "saved config"))
    validate(cfg)  # type: ignore[arg-type]
    return cfg  # type: ignore[return-value]


def save_resolved(cfg: TrainConfig, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config into the run directory (atomically)."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    out = run / "config.yaml"
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, out)
    return out


def help_table(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf field, in declaration order."""
    rows: list[tuple[str, str, str]] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            rows.extend(help_table(type(default), key + "."))
        else:
            rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows
