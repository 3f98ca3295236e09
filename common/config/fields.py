"""How a config field is declared: its default, its help text and the rules that hold for it alone.

``doc(default, help, at_least=...)`` and ``choice(Literal[...], default, help)`` keep a field's own
rules (its lowest value, its allowed values) beside it, in the field's metadata; :func:`check_fields`
reads them from there. Allowed values are a ``Literal`` type declared next to the field and imported
wherever the value is dispatched on (``typing.get_args(TreeMode)`` gives the values in order). The
annotation stays ``str`` for OmegaConf: the ``omegaconf>=2.3`` this project supports has no
``Literal`` fields, and this way a bad value fails validation with our message, not at merge time.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field
from typing import Any

from common.errors import ConfigError


def doc(default: Any, help: str, *, at_least: float | None = None, **kw: Any) -> Any:
    """A dataclass field with a default and a help text (shown by ``treepo train --help-config``);
    ``at_least``: the lowest value validation accepts (inclusive)."""
    metadata: dict[str, Any] = {"help": help}
    if at_least is not None:
        metadata["at_least"] = at_least
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def choice(allowed: Any, default: str, help: str) -> Any:
    """A string field whose values are the ``Literal`` type ``allowed`` (declared beside the field)."""
    choices = typing.get_args(allowed)
    if typing.get_origin(allowed) is not typing.Literal or default not in choices:
        raise TypeError(f"choice() needs a Literal type that holds the default {default!r}, got {allowed}")
    return field(default=default, metadata={"help": help, "choices": choices})


def nested(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


def check_fields(section: Any, prefix: str = "") -> None:
    """Every field's own rules (allowed values, lowest value), section by section in declaration order;
    raise ConfigError naming the key and the fix."""
    for f in dataclasses.fields(section):
        key, value = f"{prefix}{f.name}", getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, key + ".")
            continue
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}: set {key} to one of them")
        low = f.metadata.get("at_least")
        if low is not None and value < low:
            raise ConfigError(f"{key}={value} is too small: set {key} >= {low}")


def flat_config(cfg: Any) -> dict[str, Any]:
    """A config dataclass as ``{"tree.w": 8, "log.wandb.project": ...}``: every leaf field under its
    dotted key (the trackers' run parameters)."""
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = value

    walk(cfg, "")
    return out
