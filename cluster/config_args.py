"""The ``--config PRESET`` and ``key=value`` arguments of the commands and benchmarks that run on a
config, and their loading through :func:`common.config.load_config` (defaults <- preset <-
overrides, strictly typed and validated), so a benchmark's settings meet the same checks as a
training run's.

A benchmark may have settings of its own (its ``defaults``: e.g. a random-init model, a longer
segment): they stand in for a preset when no ``--config`` is given, and the user's ``key=value``
overrides apply on top of either.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from common.config import TrainConfig, load_config

CONFIG_HELP = "Preset YAML: a path or a name in configs/ (e.g. demo)."
OVERRIDES_HELP = "Config overrides, e.g. tree.w=16 sampling.temperature=0.8."


def add_config_arguments(
    parser: argparse.ArgumentParser,
    *,
    defaults: Sequence[str] = (),
    config_help: str = CONFIG_HELP,
    overrides_help: str = OVERRIDES_HELP,
) -> None:
    """``--config``/``-c`` and the ``KEY=VALUE`` positionals; ``defaults`` are named in the help."""
    if defaults:
        config_help += f" Without it: the config's defaults with {' '.join(defaults)}."
    parser.add_argument("--config", "-c", default=None, help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)


def requested_overrides(args: argparse.Namespace, defaults: Sequence[str] = ()) -> list[str]:
    """The overrides a run asks for: ``defaults`` (only without ``--config``), then the user's."""
    return [*([] if args.config else defaults), *args.overrides]


def load_args_config(
    args: argparse.Namespace,
    defaults: Sequence[str] = (),
    *,
    before: Sequence[str] = (),
    after: Sequence[str] = (),
) -> TrainConfig:
    """The validated config of ``args``: ``before`` (settings the user may change), the requested
    overrides, then ``after`` (settings the caller fixes, e.g. a benchmark's arm)."""
    return load_config(args.config, [*before, *requested_overrides(args, defaults), *after])
