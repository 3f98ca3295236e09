"""Prompt rows: checking one record (prompt, answer, id, metadata; verl's layout detected per file),
:func:`load_rows` over a data path, and a row's metadata on the wire. The rules are in :mod:`common.data`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.data.files import BadRows, DataReport, sources_of
from common.errors import DataError

log = logging.getLogger(__name__)

VERL_ANSWER_KEY = "reward_model.ground_truth"
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
_MISSING = object()
_ANNOUNCED: set[str] = set()


@dataclass
class PromptRow:
    """One prompt: a text or chat messages. ``source``/``row_no`` locate it in its file (for errors)."""

    id: str
    prompt: Any  # str | list[dict[str, str]]
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    row_no: int = 0


class PromptRows(list):
    """``list[PromptRow]`` with the load report attached (``.report``)."""

    report: DataReport


# --------------------------------------------------------------------------------------------------
# Checking rows
# --------------------------------------------------------------------------------------------------


def dig(rec: dict, key: str) -> Any:
    """``rec[key]`` for a dotted ``key`` (``a.b`` = ``rec["a"]["b"]``); a literal top-level key wins.
    Returns the module's missing marker when absent."""
    if key in rec:
        return rec[key]
    value: Any = rec
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


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


def _messages_problem(messages: list) -> str | None:
    """Why a list is not a chat prompt, or None when it is one."""
    if not messages:
        return "empty prompt (no messages)"
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            return f"prompt message {i} is not {{role: str, content: str}}"
        if m["role"] not in MESSAGE_ROLES:
            return f"prompt message {i} has role {m['role']!r}, not one of {', '.join(MESSAGE_ROLES)}"
    if messages[-1]["role"] != "user":
        return f"the last prompt message is from {messages[-1]['role']!r}, not the user"
    if not messages[-1]["content"].strip():
        return "empty prompt (the user message is blank)"
    return None


def _check_prompt(prompt: Any, key: str, needed: bool) -> tuple[Any, str | None]:
    if prompt is _MISSING or prompt is None:
        return ("", None) if not needed else (None, f"missing {key}")
    if isinstance(prompt, list):
        problem = _messages_problem(prompt)
        return (None, problem) if problem else ([dict(m) for m in prompt], None)
    if not isinstance(prompt, str):
        return None, f"{key} must be a string or a list of chat messages, got {type(prompt).__name__}"
    if needed and not prompt.strip():
        return None, f"empty {key}"
    return prompt, None


def _check_row(
    rec: Any, required: Sequence[str], prompt_key: str = "prompt", answer_key: str = "answer"
) -> tuple[dict[str, Any] | None, str | None]:
    """Validated fields ({id?, prompt, answer, metadata}) or the reason the row is bad."""
    if not isinstance(rec, dict):
        return None, f"not a JSON object (got {type(rec).__name__})"
    prompt, error = _check_prompt(dig(rec, prompt_key), prompt_key, "prompt" in required)
    if error:
        return None, error
    answer = dig(rec, answer_key)
    if answer is _MISSING or answer is None:
        if "answer" in required:
            return None, f"missing {answer_key}"
        answer = ""
    answer_text = _answer_text(answer)
    if answer_text is None:
        return None, f"{answer_key} must be a string or a number, got {type(answer).__name__} {answer!r:.40}"
    if "answer" in required and not answer_text.strip():
        return None, f"empty {answer_key}"
    row_id = rec.get("id")
    if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, (str, int))):
        return None, f"id must be a string or an integer, got {type(row_id).__name__}"
    if isinstance(row_id, str) and not row_id.strip():
        return None, "empty id"
    for key in required:
        if key not in ("prompt", "answer") and rec.get(key) is None:
            return None, f"missing {key}"
    dropped = {"id", prompt_key, answer_key}
    metadata = {k: v for k, v in rec.items() if k not in dropped}
    return {"id": row_id, "prompt": prompt, "answer": answer_text, "metadata": metadata}, None


def _answer_key_for(rec: Any, answer_key: str, source: str) -> str:
    """``answer_key``, with ``auto`` decided from a file's first object (verl layout detection)."""
    if answer_key != "auto":
        return answer_key
    if isinstance(rec, dict) and "answer" not in rec and dig(rec, VERL_ANSWER_KEY) is not _MISSING:
        if source not in _ANNOUNCED:
            _ANNOUNCED.add(source)
            log.warning(
                "%s: read in verl layout (no 'answer'; answers from %s, chat-message prompts, data_source and "
                "extra_info kept for the reward); set data.answer_key to choose another column",
                source,
                VERL_ANSWER_KEY,
            )
        return VERL_ANSWER_KEY
    return "answer"


def _check_columns(source: str, records: list, needed: dict[str, str]) -> None:
    """Refuse a file in which no record has one of the ``needed`` columns ({config key: column}): the
    config names columns the file does not have, so every row would be skipped one by one."""
    objects = [rec for _row, rec, error in records if error is None and isinstance(rec, dict)]
    if not objects:
        return
    absent = {k: c for k, c in needed.items() if all(dig(rec, c) is _MISSING for rec in objects)}
    if not absent:
        return
    columns: dict[str, None] = {}
    for rec in objects[:100]:
        columns.update(dict.fromkeys(map(str, rec)))
    what = " and ".join(f"{c!r} ({k})" for k, c in absent.items())
    raise DataError(
        f"{source}: no row has the column {what}; the file's columns are {', '.join(columns) or 'none'}: "
        f"set {' and '.join(f'{k}=<column>' for k in absent)} to the column that holds it "
        "(a dotted path reaches a nested field, e.g. data.answer_key=reward_model.ground_truth)"
    )


def load_rows(
    path: str | os.PathLike,
    *,
    bad_rows: str = "skip",
    required: Sequence[str] = ("prompt", "answer"),
    prompt_key: str = "prompt",
    answer_key: str = "auto",
    split: str = "train",
) -> PromptRows:
    """Read prompt rows from a file or a directory (see :mod:`common.data` for the rules)."""
    p = Path(path)
    sources = sources_of(p, split)
    bad = BadRows(str(p), bad_rows)
    rows = PromptRows()
    first_seen: dict[str, str] = {}
    for source, source_records in sources:
        name, key = Path(source).name, None
        records = list(source_records)  # a file's records are checked for its columns first
        first = next((rec for _r, rec, err in records if err is None and isinstance(rec, dict)), None)
        if first is not None:
            key = _answer_key_for(first, answer_key, source)
            needed = {"data.prompt_key": prompt_key} if "prompt" in required else {}
            if "answer" in required:
                needed["data.answer_key"] = key
            _check_columns(source, records, needed)
        for row_no, rec, error in records:
            bad.report.total += 1
            if error is None:
                fields, error = _check_row(rec, required, prompt_key, key or answer_key)
            if error is not None:
                bad.add(row_no, error, path=source)
                continue
            row_id = str(fields["id"]) if fields["id"] is not None else f"{name}:{row_no}"
            where = f"row {row_no}" if source == str(p) else f"{source}:{row_no}"
            if row_id in first_seen:
                bad.add(row_no, f"duplicate id {row_id!r} (first at {first_seen[row_id]})", path=source)
                continue
            first_seen[row_id] = where
            meta = fields["metadata"]
            rows.append(
                PromptRow(row_id, fields["prompt"], fields["answer"], meta, source=source, row_no=row_no)
            )
    rows.report = bad.finish(len(rows), "rows")
    return rows


# --------------------------------------------------------------------------------------------------
# Row metadata on the wire
# --------------------------------------------------------------------------------------------------

NESTED_META_KEY = "nested_json"
_SCALARS = (str, int, float, bool)


def wire_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """A row's metadata as tree metadata (scalars only): scalars as they are, nested values (verl's
    ``extra_info``, ``reward_model``) together as one JSON string under ``NESTED_META_KEY``."""
    out = {k: v for k, v in metadata.items() if v is None or isinstance(v, _SCALARS)}
    nested = {k: v for k, v in metadata.items() if isinstance(v, (dict, list))}
    if nested:
        out[NESTED_META_KEY] = json.dumps(nested, default=str, sort_keys=True)
    return out


def full_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """Inverse of :func:`wire_metadata`: the nested values back in place (what user rewards see)."""
    out = dict(metadata or {})
    nested = out.pop(NESTED_META_KEY, None)
    if isinstance(nested, str):
        with contextlib.suppress(ValueError):
            out.update({k: v for k, v in json.loads(nested).items() if k not in out})
    return out


__all__ = [
    "MESSAGE_ROLES",
    "NESTED_META_KEY",
    "PromptRow",
    "PromptRows",
    "VERL_ANSWER_KEY",
    "dig",
    "full_metadata",
    "load_rows",
    "wire_metadata",
]
