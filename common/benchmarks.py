"""Public math benchmarks as distributed → our prompt rows ``{id, prompt, answer, source, format, ...}``.

Formats (column names as the files are distributed; matched case-sensitively first, then ignoring case):

| format          | prompt              | answer                                         | id              |
|-----------------|---------------------|------------------------------------------------|-----------------|
| ``math500``     | problem             | answer                                         | unique_id       |
| ``aime``        | problem / Problem / question | answer / Answer (string or int)       | id / ID         |
| ``amc``         | problem             | answer (a float such as ``27.0`` → ``"27"``)   | id              |
| ``minerva``     | problem / question  | answer, else the last ``\\boxed{}`` of solution | id / idx        |
| ``olympiadbench`` | [context + "\\n\\n"] question | final_answer: a LIST of strings      | id              |

Auto-detection (``detect_format``) looks at the columns of the first valid row: ``final_answer`` →
olympiadbench; ``unique_id`` → math500; a ``solution`` but no ``answer`` → minerva; otherwise a
problem/question column with an answer column is AIME/AMC-shaped (identical conversion; the file name
picks ``amc`` when it says so, else ``aime``). ``--format`` overrides detection.

Answer normalisation: surrounding whitespace is stripped; a whole-answer math wrapper is removed
(``$x$``, ``$$x$$``, ``\\(x\\)``, ``\\[x\\]``, ``\\boxed{x}``); integers stay integers, integral floats
lose their ``.0`` (AMC's ``27.0`` → ``"27"``), other floats keep their shortest repr. A list answer
(OlympiadBench) is normalised item by item and joined with ``", "``: a problem with several answers
expects all of them, and the math verifier compares a comma-separated gold answer as a set, so
``["$1$", "$2$"]`` → ``"1, 2"`` accepts ``\\boxed{2, 1}``. A single-item list is just that item.

Bad rows (invalid JSON, not an object, no prompt, no answer, an answer of the wrong type, a solution
without a complete ``\\boxed{}`` when there is no answer field, a duplicate id) are reported with file,
row and reason through :mod:`common.data.files`'s bad-row policy: ``skip`` lists them on the report,
``reject`` raises :class:`DataError` at the first. Nothing is dropped silently: every input row is
either written or listed as bad. The original id is kept as a string (a missing id becomes
``"<source>-<row>"``). Columns not used for prompt/answer/id are kept unchanged as metadata.

Pure Python (pyarrow only to read/write parquet): no torch, ray or vllm imports.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from common.answers import last_boxed
from common.data.files import BadRows, DataReport, jsonl_records, parquet_records
from common.errors import DataError


@dataclass(frozen=True)
class BenchFormat:
    """Where a format keeps its prompt, answer and id (first present column wins)."""

    name: str
    prompt: tuple[str, ...]
    answer: tuple[str, ...]
    id: tuple[str, ...]
    solution: tuple[str, ...] = ()  # answer taken from the last \boxed{} here when no answer column
    context: tuple[str, ...] = ()  # prepended to the prompt when present and non-empty


FORMATS: dict[str, BenchFormat] = {
    f.name: f
    for f in (
        BenchFormat("math500", ("problem",), ("answer",), ("unique_id", "id")),
        BenchFormat("aime", ("problem", "question"), ("answer",), ("id", "idx")),
        BenchFormat("amc", ("problem", "question"), ("answer",), ("id", "idx")),
        BenchFormat("minerva", ("problem", "question"), ("answer",), ("id", "idx"), solution=("solution",)),
        BenchFormat(
            "olympiadbench", ("question", "problem"), ("final_answer",), ("id", "idx"), context=("context",)
        ),
    )
}

_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _column(rec: dict, names: Iterable[str]) -> str | None:
    """The key of ``rec`` holding the first of ``names`` (exact spelling first, then any case)."""
    for n in names:
        if n in rec:
            return n
    lower = {k.lower(): k for k in rec if isinstance(k, str)}
    for n in names:
        if n.lower() in lower:
            return lower[n.lower()]
    return None


def detect_format(rec: dict, file_name: str = "") -> str:
    """The format a row's columns belong to (see the module docstring); DataError if none fits."""
    has = lambda *names: _column(rec, names) is not None  # noqa: E731
    if has("final_answer"):
        return "olympiadbench"
    if has("unique_id") and has("problem") and has("answer"):
        return "math500"
    if has("problem", "question") and has("solution") and not has("answer"):
        return "minerva"
    if has("problem", "question") and has("answer"):
        stem = file_name.lower()
        for name in ("amc", "minerva", "math500", "aime"):
            if name in stem:
                return name
        return "aime"
    raise DataError(
        f"cannot tell the benchmark format from the columns {sorted(map(str, rec))}: expected one of "
        f"{', '.join(FORMATS)} (see common/benchmarks.py), or pass --format"
    )


def _unwrap(s: str) -> str:
    """Remove whole-answer math wrappers, repeatedly (``$\\boxed{3}$`` → ``3``)."""
    while True:
        t = s.strip()
        for left, right in _WRAPPERS:
            if len(t) > len(left) + len(right) - 1 and t.startswith(left) and t.endswith(right):
                inner = t[len(left) : len(t) - len(right)]
                # "$a$ and $b$" is not one wrapped answer: the inner text must not reopen the wrapper
                if left not in inner:
                    t = inner.strip()
                    break
        else:
            if t.startswith("\\boxed{") and last_boxed(t) is not None and t.endswith("}"):
                inner = last_boxed(t)
                if len(inner) == len(t) - len("\\boxed{}"):
                    t = inner.strip()
        if t == s:
            return t
        s = t


def normalize_answer(value: Any) -> str:
    """One answer as text (see the module docstring); ValueError says why a value cannot be one."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"answer must be a string, a number or a list of them, got {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"answer {value!r} is not a finite number")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        text = _unwrap(value)
        if not text:
            raise ValueError("empty answer")
        return text
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("empty answer list")
        return ", ".join(normalize_answer(v) for v in value)
    raise ValueError(f"answer must be a string, a number or a list of them, got {type(value).__name__}")


def convert_record(rec: Any, fmt: BenchFormat) -> tuple[dict | None, str | None]:
    """``({id|None, prompt, answer, metadata}, None)`` or ``(None, reason)`` for one input row."""
    if not isinstance(rec, dict):
        return None, f"not a JSON object (got {type(rec).__name__})"
    pkey = _column(rec, fmt.prompt)
    prompt = rec.get(pkey) if pkey else None
    names = "/".join(fmt.prompt)
    if prompt is None:
        return None, f"missing problem text ({names})"
    if not isinstance(prompt, str):
        return None, f"problem text ({names}) must be a string, got {type(prompt).__name__}"
    if not prompt.strip():
        return None, f"empty problem text ({names})"
    used = {pkey}
    ckey = _column(rec, fmt.context) if fmt.context else None
    if ckey:
        used.add(ckey)
        ctx = rec.get(ckey)
        if isinstance(ctx, str) and ctx.strip():
            prompt = f"{ctx.strip()}\n\n{prompt}"
    akey = _column(rec, fmt.answer)
    raw = rec.get(akey) if akey else None
    if raw is None and fmt.solution:
        skey = _column(rec, fmt.solution)
        sol = rec.get(skey) if skey else None
        if not isinstance(sol, str):
            return None, f"no answer column ({'/'.join(fmt.answer)}) and no solution text to take it from"
        raw = last_boxed(sol)
        if raw is None:
            return None, "no answer column and the solution has no complete \\boxed{...}"
    elif raw is None:
        return None, f"missing answer ({'/'.join(fmt.answer)})"
    if akey:
        used.add(akey)
    try:
        answer = normalize_answer(raw)
    except ValueError as e:
        return None, str(e)
    ikey = _column(rec, fmt.id)
    row_id = rec.get(ikey) if ikey else None
    if row_id is not None:
        used.add(ikey)
        if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
            return None, f"id must be a string or an integer, got {type(row_id).__name__}"
        row_id = str(row_id).strip()
        if not row_id:
            return None, "empty id"
    reserved = {"id", "prompt", "answer", "source", "format"}
    metadata = {k: v for k, v in rec.items() if k not in used and k not in reserved}
    return {"id": row_id, "prompt": prompt, "answer": answer, "metadata": metadata}, None


def _records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return jsonl_records(path)
    if suffix in (".parquet", ".pq"):
        return parquet_records(path)
    raise DataError(
        f"benchmark file {str(path)!r} has an unsupported format {suffix!r}: use .jsonl or .parquet"
    )


@dataclass
class ConvertResult:
    rows: list[dict]
    format: str
    source: str
    report: DataReport


def convert_file(
    path: str | os.PathLike, *, format: str | None = None, source: str | None = None, bad_rows: str = "skip"
) -> ConvertResult:
    """Read one benchmark file and return our rows (``source`` defaults to the file's stem)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"benchmark file {str(p)!r} does not exist: check the path")
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown benchmark format {format!r}: use one of {', '.join(FORMATS)}")
    source = source or p.stem
    bad = BadRows(str(p), bad_rows)
    fmt = FORMATS[format] if format else None
    rows: list[dict] = []
    first_seen: dict[str, int] = {}
    for row_no, rec, error in _records(p):
        bad.report.total += 1
        if error is None and fmt is None:
            if not isinstance(rec, dict):
                error = f"not a JSON object (got {type(rec).__name__})"
            else:
                fmt = FORMATS[detect_format(rec, p.name)]
        if error is None:
            fields, error = convert_record(rec, fmt)
        if error is not None:
            bad.add(row_no, error)
            continue
        row_id = fields["id"] if fields["id"] is not None else f"{source}-{row_no}"
        if row_id in first_seen:
            bad.add(row_no, f"duplicate id {row_id!r} (first at row {first_seen[row_id]})")
            continue
        first_seen[row_id] = row_no
        rows.append(
            {
                "id": row_id,
                "prompt": fields["prompt"],
                "answer": fields["answer"],
                "source": source,
                "format": fmt.name,
                **fields["metadata"],
            }
        )
    report = bad.finish(len(rows), "benchmark rows")
    return ConvertResult(rows, fmt.name if fmt else "?", source, report)


def write_rows(rows: list[dict], out: str | os.PathLike) -> Path:
    """Write rows as .jsonl (one JSON object per line) or .parquet, into a temp file then renamed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    suffix = out.suffix.lower()
    if suffix == ".jsonl":
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    elif suffix in (".parquet", ".pq"):
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        raise DataError(f"output {str(out)!r} must end in .jsonl or .parquet")
    os.replace(tmp, out)
    return out


__all__ = [
    "FORMATS",
    "BenchFormat",
    "ConvertResult",
    "convert_file",
    "convert_record",
    "detect_format",
    "normalize_answer",
    "write_rows",
]
