"""The benchmarks' shared reporter: the JSON result (printed; also written to a file on request) and
a table whose ratio columns compare each row with the baseline measured in the same run."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO


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
    columns: Sequence[tuple[str, int]], rows: Sequence[Sequence[str]], stream: TextIO | None = None
) -> None:
    """A blank line, the header, then one line per row: the first column left-aligned to its width,
    the others right-aligned (cells are already formatted)."""
    out = stream or sys.stdout

    def line(cells: Sequence[str]) -> str:
        (_, w0), rest = columns[0], columns[1:]
        return f"{cells[0]:<{w0}}" + "".join(f"{c:>{w}}" for c, (_, w) in zip(cells[1:], rest)) + "\n"

    out.write("\n" + line([name for name, _ in columns]))
    for row in rows:
        out.write(line(row))
