"""Prompt datasets: rows ``{id, prompt, answer, ...}`` from .jsonl, .parquet or .arrow files, Hugging
Face ``datasets`` directories and directories of shards; several files mixed by weight; templates.

Rules:

- A row needs a prompt and an answer, found under ``prompt_key`` / ``answer_key`` (dotted paths into
  nested objects, e.g. ``reward_model.ground_truth``; a top-level key spelled with a dot wins). The
  prompt is a non-empty string or a list of chat messages ``{role, content}`` (the last one from the
  user); the answer a string, or a number converted to its string (integral floats such as
  parquet's ``12.0`` become ``"12"``). Other top-level keys are kept as metadata. A missing ``id``
  becomes ``"<file name>:<row>"`` (stable while the file is unchanged); ids are strings (an integer id
  is converted), and a repeated id is a bad row.
- ``answer_key="auto"`` (the default) reads ``answer``, or, in verl's layout (no ``answer``, a
  ``reward_model.ground_truth``: the TreePO release's data, DAPO-Math-17k), the ground truth; the
  detection is per file and logged once per file and process. ``data_source`` and ``extra_info``
  stay in the metadata, where verl-signature rewards find them.
- A bad row (invalid JSON or UTF-8, not an object, missing/empty prompt or answer, malformed
  messages, wrong types, duplicate id, and at encoding time a prompt longer than ``max_prompt_tokens``
  or one the template cannot render) is reported with its file, 1-based row number (the line number
  for jsonl; the row within the shard for a directory) and the reason. ``bad_rows="skip"`` logs the
  first few and returns a :class:`DataReport` listing all of them on the result (``rows.report``);
  ``"reject"`` raises :class:`DataError` at the first one. No usable rows at all is always an error.
  Blank jsonl lines are ignored.
- Directories: a ``datasets`` ``save_to_disk`` directory (read with ``datasets.load_from_disk``; for a
  saved ``DatasetDict`` the ``train`` split for training, the first of ``test``/``validation``/
  ``eval``/``dev`` for held-out data, or point at ``DIR/<split>``), else every ``.parquet``,
  ``.arrow`` and ``.jsonl`` shard under it in path order (the hub's ``data/train-00000-of-00002.parquet``
  layout: when shard paths name splits, only the wanted split's shards).
- Templates: ``plain`` = system prompt + ``"\\n\\n"`` (when set) + prompt, encoded without special
  tokens (a message prompt must then be one user message, after an optional system message);
  ``chat`` = the tokenizer's chat template with the generation prompt appended, over a system
  message (when set) and the user message, or over the row's messages as they are (a row with its
  own system message and ``system_prompt`` set is a bad row: one of them must go).
- Mixtures (``data.train`` as a list): each file is loaded and encoded on its own, then the mixture
  holds as many prompts as the files together; with ``data.train_weights`` file ``i`` contributes
  ``w_i / sum(w)`` of them (largest-remainder rounding): a seeded subset of its prompts, or all of
  them repeated (copies get ids ``<id>#2``, ``#3``, ...) plus a seeded subset. Ids become
  ``<file label>/<id>``. The order is fixed by the files, the weights and the seed, so the prompt
  dispatch (which shuffles per epoch) and a resumed run see the same list.

Synthetic ``synthetic:<task>`` specs are resolved to files elsewhere (common.tasks); this module
only reads paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import DataError

log = logging.getLogger(__name__)

BAD_ROW_MODES = ("skip", "reject")
TEMPLATES = ("plain", "chat")
MAX_LOGGED_BAD_ROWS = 10
VERL_ANSWER_KEY = "reward_model.ground_truth"
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
FILE_SUFFIXES = (".jsonl", ".parquet", ".pq", ".arrow")
HELD_OUT_SPLITS = ("test", "validation", "valid", "eval", "dev")
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
# Reading records: files, datasets directories, shards
# --------------------------------------------------------------------------------------------------

Records = Iterator[tuple[int, Any, "str | None"]]  # (row number, parsed object or None, error)


def _jsonl_records(path: Path) -> Records:
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


def _batch_records(batches: Iterable[Any]) -> Records:
    row_no = 0
    for batch in batches:
        for rec in batch.to_pylist():
            row_no += 1
            yield row_no, rec, None


def _parquet_records(path: Path) -> Records:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or foreign file
        raise DataError(f"cannot read {path} as parquet ({type(e).__name__}: {e}): check the file") from None
    return _batch_records(pf.iter_batches(batch_size=4096))


def _arrow_records(path: Path) -> Records:
    """An Arrow IPC file or stream (``datasets`` writes streams; pyarrow's feather v2 is a file)."""
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_file(source)
        batches: Iterable[Any] = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        try:
            batches = pa.ipc.open_stream(pa.memory_map(str(path)))
        except Exception as e:  # corrupt or foreign
            raise DataError(
                f"cannot read {path} as Arrow ({type(e).__name__}: {e}): check the file"
            ) from None
    return _batch_records(batches)


def _file_records(path: Path) -> Records:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_records(path)
    if suffix in (".parquet", ".pq"):
        return _parquet_records(path)
    if suffix == ".arrow":
        return _arrow_records(path)
    raise DataError(
        f"data file {str(path)!r} has an unsupported format {suffix!r}: use .jsonl or .parquet "
        "(or .arrow, or a Hugging Face datasets directory)"
    )


def _pick_split(available: Sequence[str], split: str, where: str) -> str:
    wanted = ("train",) if split == "train" else HELD_OUT_SPLITS
    for name in wanted:
        if name in available:
            return name
    raise DataError(
        f"{where} has the splits {', '.join(available)} and none for {split!r} ({'/'.join(wanted)}): "
        f"point the data key at {where}/<split>"
    )


def _saved_dataset(path: Path, split: str) -> list[tuple[str, Records]]:
    """A ``datasets`` ``save_to_disk`` directory (one Dataset, or a DatasetDict of splits)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        return _saved_dataset(path / _pick_split(splits, split, str(path)), split)
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path} is a Hugging Face datasets directory: install the datasets package (scripts/setup.sh does)"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types for a damaged directory
        raise DataError(
            f"cannot load {path} with datasets.load_from_disk ({type(e).__name__}: {e})"
        ) from None
    return [(str(path), _batch_records(ds.with_format("arrow").iter(batch_size=4096)))]


_SPLIT_WORD = re.compile(r"[A-Za-z]+")


def _split_of(rel: Path) -> str | None:
    for part in rel.parts:
        for word in _SPLIT_WORD.findall(part.lower()):
            if word == "train" or word in HELD_OUT_SPLITS:
                return word
    return None


def _shards(path: Path, split: str) -> list[tuple[str, Records]]:
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in FILE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(
            f"data directory {path} holds no .parquet, .arrow or .jsonl shards and is not a datasets "
            "save_to_disk directory: check the path"
        )
    named = {f: _split_of(f.relative_to(path)) for f in files}
    if any(named.values()):
        available = sorted({s for s in named.values() if s})
        chosen = _pick_split(available, split, str(path))
        files = [f for f in files if named[f] == chosen]
    return [(str(f), _file_records(f)) for f in files]


def _sources(path: Path, split: str) -> list[tuple[str, Records]]:
    """``(file or directory name, records)`` for every part of a data path, in order."""
    if path.is_file():
        return [(str(path), _file_records(path))]
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _saved_dataset(path, split)
        return _shards(path, split)
    raise DataError(f"data file {str(path)!r} does not exist: check the path (or use 'synthetic:<task>')")


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
            log.info(
                "%s: verl layout (no 'answer'; answers from %s, chat-message prompts, data_source and "
                "extra_info kept for the reward); set data.answer_key to choose another column",
                source,
                VERL_ANSWER_KEY,
            )
        return VERL_ANSWER_KEY
    return "answer"


def load_rows(
    path: str | os.PathLike,
    *,
    bad_rows: str = "skip",
    required: Sequence[str] = ("prompt", "answer"),
    prompt_key: str = "prompt",
    answer_key: str = "auto",
    split: str = "train",
) -> PromptRows:
    """Read prompt rows from a file or a directory (see the module docstring for the rules)."""
    p = Path(path)
    sources = _sources(p, split)
    bad = _BadRows(str(p), bad_rows)
    rows = PromptRows()
    first_seen: dict[str, str] = {}
    for source, records in sources:
        name, key = Path(source).name, None
        for row_no, rec, error in records:
            bad.report.total += 1
            if key is None and isinstance(rec, dict):
                key = _answer_key_for(rec, answer_key, source)
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
# Templates
# --------------------------------------------------------------------------------------------------


class _RowProblem(ValueError):
    """A row the template cannot render (a bad row, not a configuration error)."""


def _ids(encoded: Any) -> list[int]:
    if hasattr(encoded, "ids"):  # a raw ``tokenizers.Encoding``
        return list(encoded.ids)
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):  # BatchEncoding
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


def _plain_text(prompt: Any, system_prompt: str) -> str:
    if isinstance(prompt, list):
        roles = [m["role"] for m in prompt]
        if roles not in (["user"], ["system", "user"]):
            raise _RowProblem(
                f"prompt has messages {roles}; data.template=plain takes one user message (after an "
                "optional system message): use data.template=chat"
            )
        if roles[0] == "system" and system_prompt:
            raise _RowProblem(_BOTH_SYSTEMS)
        system_prompt = prompt[0]["content"] if roles[0] == "system" else system_prompt
        prompt = prompt[-1]["content"]
    return f"{system_prompt}\n\n{prompt}" if system_prompt else prompt


_BOTH_SYSTEMS = (
    "the row has its own system message and data.system_prompt is set: unset data.system_prompt "
    "or remove the rows' system messages"
)


def _chat_messages(prompt: Any, system_prompt: str) -> list[dict]:
    if isinstance(prompt, list):
        if system_prompt and prompt[0]["role"] == "system":
            raise _RowProblem(_BOTH_SYSTEMS)
        head = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return head + [{"role": m["role"], "content": m["content"]} for m in prompt]
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return messages


def format_prompt(
    row: PromptRow, tokenizer: Any, template: str = "plain", system_prompt: str = ""
) -> list[int]:
    """Token ids of one prompt under ``template`` (plain | chat). A row the template cannot render
    raises :class:`DataError` naming the row (:func:`encode_rows` reports it as a bad row instead)."""
    try:
        return _format(row, tokenizer, template, system_prompt)
    except _RowProblem as e:
        raise DataError(f"{row.source}:{row.row_no}: {e}") from None


def _format(row: PromptRow, tokenizer: Any, template: str, system_prompt: str) -> list[int]:
    if template == "plain":
        text = _plain_text(row.prompt, system_prompt)
        # works for transformers tokenizers (a list) and raw ``tokenizers.Tokenizer`` (an Encoding)
        return _ids(tokenizer.encode(text, add_special_tokens=False))
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None) or not hasattr(tokenizer, "apply_chat_template"):
            raise DataError(
                "data.template=chat but the tokenizer has no chat template: use data.template=plain or a "
                "tokenizer (model) that ships a chat template"
            )
        messages = _chat_messages(row.prompt, system_prompt)
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
    """Encode every row; a prompt longer than ``max_prompt_tokens`` or one the template cannot render
    is a bad row (skipped or fatal)."""
    source = rows[0].source if rows else "<no rows>"
    bad = _BadRows(source, bad_rows)
    out = EncodedRows()
    for row in rows:
        bad.report.total += 1
        try:
            ids = _format(row, tokenizer, template, system_prompt)
        except _RowProblem as e:
            bad.add(row.row_no, str(e), path=row.source or source)
            continue
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


# --------------------------------------------------------------------------------------------------
# Specs, mixtures, and the one entry point for a run's prompts
# --------------------------------------------------------------------------------------------------


def resolve_data_path(spec: str, split: str, cfg: Any) -> tuple[Path, str | None]:
    """``(path, task)`` for a data spec: a file or dataset directory (task None) or ``synthetic:<task>``
    (the task's ``split`` written once into the cache, sized and seeded by the DataConfig ``cfg``)."""
    if spec.startswith("synthetic:"):
        from common.tasks import get_task, synthetic_path

        task = spec.split(":", 1)[1]
        get_task(task)  # DataError naming the known tasks
        n = cfg.synthetic_train_size if split == "train" else cfg.synthetic_eval_size
        return synthetic_path(task, split, n, cfg.synthetic_seed), task
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"data file {path} does not exist: pass a .jsonl/.parquet/.arrow file, a datasets directory "
            "or synthetic:<task>"
        )
    return path, None


def _load_encoded(path: Path, split: str, tokenizer: Any, cfg: Any, first_rows: int = 0) -> EncodedRows:
    rows = load_rows(
        path,
        bad_rows=cfg.bad_rows,
        prompt_key=getattr(cfg, "prompt_key", "prompt"),
        answer_key=getattr(cfg, "answer_key", "auto"),
        split=split,
    )
    report = rows.report
    if first_rows:
        rows = rows[:first_rows]
    out = encode_rows(rows, tokenizer, cfg.template, cfg.system_prompt, cfg.max_prompt_tokens, cfg.bad_rows)
    # one report for the file: rows read, bad at loading and at encoding
    out.report = DataReport(str(path), report.total, len(out), report.bad + out.report.bad)
    return out


def load_prompts(path: str | os.PathLike, tokenizer: Any, cfg: Any, split: str = "train") -> EncodedRows:
    """``load_rows`` + ``encode_rows`` of one file or directory with a :class:`common.config.DataConfig`."""
    return _load_encoded(Path(path), split, tokenizer, cfg)


def _labels(paths: Sequence[Path]) -> list[str]:
    """A short unique label per mixture member (its file name; its position too when names repeat)."""
    names = [p.name for p in paths]
    return [f"{i}-{n}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def mixture_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Prompts per file for a mixture of ``sum(sizes)`` prompts in the shares ``weights`` (largest
    remainder rounding; ties go to the earlier file)."""
    total, wsum = sum(sizes), float(sum(weights))
    raw = [total * w / wsum for w in weights]
    counts = [math.floor(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _take(prompts: Sequence[EncodedPrompt], n: int, seed: int, index: int) -> list[tuple[EncodedPrompt, int]]:
    """``n`` of ``prompts`` as (prompt, copy number): whole passes, then a seeded subset (file order)."""
    import numpy as np

    full, rest = divmod(n, len(prompts))
    out = [(p, c) for c in range(full) for p in prompts]
    if rest:
        pick = np.sort(np.random.default_rng([int(seed), int(index)]).permutation(len(prompts))[:rest])
        out += [(prompts[int(i)], full) for i in pick]
    return out


def mix_prompts(
    parts: Sequence[EncodedRows], labels: Sequence[str], weights: Sequence[float], seed: int
) -> EncodedRows:
    """One list from several files' prompts (module docstring: Mixtures)."""
    counts = mixture_counts([len(p) for p in parts], weights) if weights else [len(p) for p in parts]
    out = EncodedRows()
    report = DataReport(" + ".join(labels))
    for i, (part, label, n) in enumerate(zip(parts, labels, counts)):
        report.total += part.report.total
        report.bad.extend(part.report.bad)
        for enc, copy in _take(part, n, seed, i):
            row_id = f"{label}/{enc.row.id}" + (f"#{copy + 1}" if copy else "")
            out.append(EncodedPrompt(dataclasses.replace(enc.row, id=row_id), enc.prompt_ids))
        if n > len(part):
            log.info("data mixture: %s has %d prompts, repeated to %d", label, len(part), n)
    report.kept = len(out)
    if not out:
        raise DataError(f"the data mixture {report.path} is empty: raise the weights of non-empty files")
    out.report = report
    return out


def load_prompt_set(
    spec: str | Sequence[str], split: str, tokenizer: Any, cfg: Any, *, first_rows: int = 0
) -> tuple[EncodedRows, Path, str | None]:
    """``(encoded prompts, path, task)`` of a data spec: a path, ``synthetic:<task>``, or a list of
    them (a mixture weighted by ``cfg.train_weights`` for the train split). ``path`` is the first
    member's; ``task`` the synthetic task when every member is that task. ``first_rows``: only each
    file's first rows (before encoding)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise DataError(f"no data files given for the {split} split: set data.{split}")
    resolved = [resolve_data_path(s, split, cfg) for s in specs]
    parts = [_load_encoded(path, split, tokenizer, cfg, first_rows) for path, _ in resolved]
    tasks = {task for _, task in resolved}
    task = tasks.pop() if len(tasks) == 1 else None
    if len(parts) == 1:
        return parts[0], resolved[0][0], task
    weights = list(getattr(cfg, "train_weights", []) or []) if split == "train" else []
    if weights and len(weights) != len(parts):
        raise DataError(
            f"data.train_weights has {len(weights)} weights for {len(parts)} files: give one weight per file"
        )
    mixed = mix_prompts(
        parts, _labels([p for p, _ in resolved]), weights, int(getattr(cfg, "shuffle_seed", 0))
    )
    return mixed, resolved[0][0], task


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
    "BadRow",
    "DataReport",
    "EncodedPrompt",
    "EncodedRows",
    "PromptRow",
    "PromptRows",
    "dig",
    "encode_rows",
    "format_prompt",
    "full_metadata",
    "load_prompt_set",
    "load_prompts",
    "load_rows",
    "mix_prompts",
    "mixture_counts",
    "resolve_data_path",
    "wire_metadata",
]
