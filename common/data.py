"""Prompt datasets: rows ``{id, prompt, answer, ...}`` from .jsonl or .parquet, and prompt templates.

Rules:

- A row needs a non-empty string ``prompt`` and an ``answer`` (a string, or a number converted to
  its string: integral floats such as parquet's ``12.0`` become ``"12"``). Other keys are kept as
  metadata. A missing ``id`` becomes ``"<file name>:<row>"`` (stable while the file is unchanged);
  ids are strings (an integer id is converted), and a repeated id is a bad row.
- A bad row (invalid JSON or UTF-8, not an object, missing/empty prompt, missing/empty answer,
  wrong types, duplicate id, and at encoding time a prompt longer than ``max_prompt_tokens``) is
  reported with its file, 1-based row number (the line number for jsonl) and the reason.
  ``bad_rows="skip"`` logs the first few and returns a :class:`DataReport` listing all of them on the
  result (``rows.report``); ``"reject"`` raises :class:`DataError` at the first one. No usable rows
  at all is always an error. Blank jsonl lines are ignored.
- Templates: ``plain`` = system prompt + ``"\\n\\n"`` (when set) + prompt, encoded without special
  tokens; ``chat`` = the tokenizer's chat template with a system (when set) and a user message and
  the generation prompt appended.

Synthetic ``synthetic:<task>`` specs are resolved to files elsewhere (common.tasks); this module
only reads paths.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import DataError

log = logging.getLogger(__name__)

BAD_ROW_MODES = ("skip", "reject")
TEMPLATES = ("plain", "chat")
MAX_LOGGED_BAD_ROWS = 10
_MISSING = object()


@dataclass
class PromptRow:
    """One prompt. ``source``/``row_no`` locate it in its file (for error messages)."""

    id: str
    prompt: str
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    row_no: int = 0


@dataclass(frozen=True)
class BadRow:
    path: str
    row: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.row}: {self.reason}"


@dataclass
class DataReport:
    """What happened to the rows of one file: how many were read, kept, and which were bad and why."""

    path: str
    total: int = 0
    kept: int = 0
    bad: list[BadRow] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.path}: {self.kept} of {self.total} rows kept, {len(self.bad)} bad"


class PromptRows(list):
    """``list[PromptRow]`` with the load report attached (``.report``)."""

    report: DataReport


@dataclass
class EncodedPrompt:
    row: PromptRow
    prompt_ids: list[int]


class EncodedRows(list):
    """``list[EncodedPrompt]`` with the encoding report attached (``.report``)."""

    report: DataReport


class _BadRows:
    """Collects bad rows under one policy: reject raises at once, skip logs the first few."""

    def __init__(self, path: str, mode: str) -> None:
        if mode not in BAD_ROW_MODES:
            raise DataError(f"bad_rows={mode!r} is not one of {', '.join(BAD_ROW_MODES)}: set data.bad_rows")
        self.mode = mode
        self.report = DataReport(path)

    def add(self, row: int, reason: str, path: str | None = None) -> None:
        bad = BadRow(path or self.report.path, row, reason)
        if self.mode == "reject":
            raise DataError(f"{bad} (data.bad_rows=reject; fix the row or set data.bad_rows=skip)")
        self.report.bad.append(bad)
        if len(self.report.bad) <= MAX_LOGGED_BAD_ROWS:
            log.warning("skipping bad row %s", bad)

    def finish(self, kept: int, what: str) -> DataReport:
        r = self.report
        r.kept = kept
        if len(r.bad) > MAX_LOGGED_BAD_ROWS:
            log.warning(
                "%s: %d more bad rows skipped (%d in all)",
                r.path,
                len(r.bad) - MAX_LOGGED_BAD_ROWS,
                len(r.bad),
            )
        if kept == 0:
            first = f"; first: {r.bad[0]}" if r.bad else ""
            raise DataError(
                f"{r.path}: no usable {what} ({r.total} rows, {len(r.bad)} bad{first}): fix the file"
            )
        return r


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed object or None, error) for every non-blank line."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, None, f"not UTF-8 ({e.reason} at byte {e.start})"
                continue
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text), None
            except json.JSONDecodeError as e:
                yield line_no, None, f"invalid JSON ({e.msg} at column {e.colno})"


def _parquet_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or foreign file
        raise DataError(f"cannot read {path} as parquet ({type(e).__name__}: {e}): check the file") from None
    row_no = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            row_no += 1
            yield row_no, rec, None


def _answer_text(value: Any) -> str | None:
    """The answer as a string, or None when its type cannot be an answer."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def _check_row(rec: Any, required: Sequence[str]) -> tuple[dict[str, Any] | None, str | None]:
    """Validated fields ({id?, prompt, answer, metadata}) or the reason the row is bad."""
    if not isinstance(rec, dict):
        return None, f"not a JSON object (got {type(rec).__name__})"
    prompt = rec.get("prompt", _MISSING)
    if prompt is _MISSING or prompt is None:
        if "prompt" in required:
            return None, "missing prompt"
        prompt = ""
    if not isinstance(prompt, str):
        return None, f"prompt must be a string, got {type(prompt).__name__}"
    if "prompt" in required and not prompt.strip():
        return None, "empty prompt"
    answer = rec.get("answer", _MISSING)
    if answer is _MISSING or answer is None:
        if "answer" in required:
            return None, "missing answer"
        answer = ""
    answer_text = _answer_text(answer)
    if answer_text is None:
        return None, f"answer must be a string or a number, got {type(answer).__name__} {answer!r:.40}"
    if "answer" in required and not answer_text.strip():
        return None, "empty answer"
    row_id = rec.get("id")
    if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, (str, int))):
        return None, f"id must be a string or an integer, got {type(row_id).__name__}"
    if isinstance(row_id, str) and not row_id.strip():
        return None, "empty id"
    for key in required:
        if key not in ("prompt", "answer") and rec.get(key) is None:
            return None, f"missing {key}"
    metadata = {k: v for k, v in rec.items() if k not in ("id", "prompt", "answer")}
    return {"id": row_id, "prompt": prompt, "answer": answer_text, "metadata": metadata}, None


def load_rows(
    path: str | os.PathLike,
    *,
    bad_rows: str = "skip",
    required: Sequence[str] = ("prompt", "answer"),
) -> PromptRows:
    """Read prompt rows from a .jsonl or .parquet file (see the module docstring for the rules)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} does not exist: check the path (or use 'synthetic:<task>')")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        records: Iterable[tuple[int, Any, str | None]] = _jsonl_records(p)
    elif suffix in (".parquet", ".pq"):
        records = _parquet_records(p)
    else:
        raise DataError(f"data file {str(p)!r} has an unsupported format {suffix!r}: use .jsonl or .parquet")

    bad = _BadRows(str(p), bad_rows)
    rows = PromptRows()
    first_seen: dict[str, int] = {}
    for row_no, rec, error in records:
        bad.report.total += 1
        if error is None:
            fields, error = _check_row(rec, required)
        if error is not None:
            bad.add(row_no, error)
            continue
        row_id = str(fields["id"]) if fields["id"] is not None else f"{p.name}:{row_no}"
        if row_id in first_seen:
            bad.add(row_no, f"duplicate id {row_id!r} (first at row {first_seen[row_id]})")
            continue
        first_seen[row_id] = row_no
        rows.append(
            PromptRow(
                row_id, fields["prompt"], fields["answer"], fields["metadata"], source=str(p), row_no=row_no
            )
        )
    rows.report = bad.finish(len(rows), "rows")
    return rows


# --------------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------------


def _ids(encoded: Any) -> list[int]:
    if hasattr(encoded, "ids"):  # a raw ``tokenizers.Encoding``
        return list(encoded.ids)
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):  # BatchEncoding
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


def format_prompt(
    row: PromptRow, tokenizer: Any, template: str = "plain", system_prompt: str = ""
) -> list[int]:
    """Token ids of one prompt under ``template`` (plain | chat)."""
    if template == "plain":
        text = f"{system_prompt}\n\n{row.prompt}" if system_prompt else row.prompt
        # works for transformers tokenizers (a list) and raw ``tokenizers.Tokenizer`` (an Encoding)
        return _ids(tokenizer.encode(text, add_special_tokens=False))
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None) or not hasattr(tokenizer, "apply_chat_template"):
            raise DataError(
                "data.template=chat but the tokenizer has no chat template: use data.template=plain or a "
                "tokenizer (model) that ships a chat template"
            )
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": row.prompt})
        try:
            out = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as e:  # jinja errors (e.g. a template that rejects a system role) come in many types
            raise DataError(
                f"the tokenizer's chat template failed on row {row.source}:{row.row_no} ({type(e).__name__}: {e}); "
                "fix data.system_prompt, or use data.template=plain"
            ) from None
        return _ids(out)
    raise DataError(f"template {template!r} is not one of {', '.join(TEMPLATES)}: set data.template")


def encode_rows(
    rows: Sequence[PromptRow],
    tokenizer: Any,
    template: str = "plain",
    system_prompt: str = "",
    max_prompt_tokens: int | None = None,
    bad_rows: str = "skip",
) -> EncodedRows:
    """Encode every row; a prompt longer than ``max_prompt_tokens`` is a bad row (skipped or fatal)."""
    source = rows[0].source if rows else "<no rows>"
    bad = _BadRows(source, bad_rows)
    out = EncodedRows()
    for row in rows:
        bad.report.total += 1
        ids = format_prompt(row, tokenizer, template, system_prompt)
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            bad.add(
                row.row_no,
                f"prompt has {len(ids)} tokens > max_prompt_tokens={max_prompt_tokens} (raise data.max_prompt_tokens)",
                path=row.source or source,
            )
            continue
        if not ids:
            bad.add(row.row_no, "prompt encodes to no tokens", path=row.source or source)
            continue
        out.append(EncodedPrompt(row, ids))
    out.report = bad.finish(len(out), "prompts after encoding")
    return out


def resolve_data_path(spec: str, split: str, cfg: Any) -> tuple[Path, str | None]:
    """``(file, task)`` for a data spec: a jsonl/parquet path (task None) or ``synthetic:<task>``
    (the task's ``split`` written once into the cache, sized and seeded by the DataConfig ``cfg``)."""
    if spec.startswith("synthetic:"):
        from common.tasks import get_task, synthetic_path

        task = spec.split(":", 1)[1]
        get_task(task)  # DataError naming the known tasks
        n = cfg.synthetic_train_size if split == "train" else cfg.synthetic_eval_size
        return synthetic_path(task, split, n, cfg.synthetic_seed), task
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"data file {path} does not exist: pass a .jsonl/.parquet file or synthetic:<task>")
    return path, None


def load_prompts(path: str | os.PathLike, tokenizer: Any, cfg: Any) -> EncodedRows:
    """``load_rows`` + ``encode_rows`` with a :class:`common.config.DataConfig`."""
    rows = load_rows(path, bad_rows=cfg.bad_rows)
    return encode_rows(rows, tokenizer, cfg.template, cfg.system_prompt, cfg.max_prompt_tokens, cfg.bad_rows)


__all__ = [
    "BadRow",
    "DataReport",
    "EncodedPrompt",
    "EncodedRows",
    "PromptRow",
    "PromptRows",
    "encode_rows",
    "format_prompt",
    "load_prompts",
    "load_rows",
    "resolve_data_path",
]
