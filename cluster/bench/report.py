"""The benchmarks' shared reporter: the JSON result (printed; also written to a file on request) and
a table whose ratio columns compare each row with the baseline measured in the same run; the
arguments every benchmark shares (``--json``, the run's config)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from cluster.config_args import add_config_arguments
from common.config import ModelConfig


def add_bench_arguments(
    parser: argparse.ArgumentParser, defaults: Sequence[str], overrides_help: str, **config_kw: str
) -> None:
    """``--json PATH`` and the config's arguments (the bench's own ``defaults`` stand in for a preset)."""
    parser.add_argument("--json", default="", help="Also write the JSON result to this file.")
    add_config_arguments(parser, defaults=defaults, overrides_help=overrides_help, **config_kw)


def ratio(value: float, baseline: float) -> float:
    """``value / baseline``; NaN when the baseline is 0 (nothing to compare with)."""
    return value / baseline if baseline else float("nan")


def emit_json(report: Any, path: str | Path = "", indent: int = 2) -> str:
    """Print ``report`` as JSON and, with ``path``, write it there too; returns the text."""
    text = json.dumps(report, indent=indent)
    print(text)
    if path:
        Path(path).write_text(text + "\n")
    return text


def print_table(
    columns: Sequence[tuple[str, int]],
    rows: Sequence[Sequence[Any]],
    *,
    left: int = 1,
    sep: str = "",
    stream: TextIO | None = None,
) -> None:
    """A blank line, the header, then one line per row: the first ``left`` columns left-aligned to
    their widths, the others right-aligned, joined by ``sep`` (cells are already formatted)."""
    out = stream or sys.stdout

    def line(cells: Sequence[Any]) -> str:
        return (
            sep.join(
                f"{c!s:<{w}}" if i < left else f"{c!s:>{w}}"
                for i, (c, (_, w)) in enumerate(zip(cells, columns))
            )
            + "\n"
        )

    out.write("\n" + line([name for name, _ in columns]))
    for row in rows:
        out.write(line(row))


def model_label(model: ModelConfig) -> str:
    """The model a report names: the path, or for a tiny model its size and whether it is random-init."""
    if not model.path.startswith("tiny:"):
        return model.path
    init = "random init" if not model.tiny_warmup_steps else f"seed {model.tiny_seed}"
    return f"{model.path} {model.tiny_size} ({init})"
