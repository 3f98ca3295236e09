"""Reading data files: records from .jsonl, .parquet and .arrow files, Hugging Face ``datasets``
directories and directories of shards, and the bad-row policy (:class:`BadRows`) every reader of rows
shares (:mod:`common.data`'s rows, :mod:`common.benchmarks`). The rules are in :mod:`common.data`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import pyarrow as pa
import pyarrow.parquet as pq

from common.config import BadRows as BadRowMode
from common.errors import DataError

log = logging.getLogger(__name__)

BAD_ROW_MODES = get_args(BadRowMode)  # data.bad_rows
MAX_LOGGED_BAD_ROWS = 10
FILE_SUFFIXES = (".jsonl", ".parquet", ".pq", ".arrow")
HELD_OUT_SPLITS = ("test", "validation", "valid", "eval", "dev")


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


class BadRows:
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


def jsonl_records(path: Path) -> Records:
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
                yield line_no, None, f"invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"


def _batch_records(batches: Iterable[Any]) -> Records:
    row_no = 0
    for batch in batches:
        for rec in batch.to_pylist():
            row_no += 1
            yield row_no, rec, None


def parquet_records(path: Path) -> Records:
    """(row number, record, None) for every row of a parquet file (DataError if it cannot be read)."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or foreign file
        raise DataError(f"cannot read {path} as parquet ({type(e).__name__}: {e}): check the file") from None
    return _batch_records(pf.iter_batches(batch_size=4096))


def _arrow_records(path: Path) -> Records:
    """An Arrow IPC file or stream (``datasets`` writes streams; pyarrow's feather v2 is a file)."""
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
        return jsonl_records(path)
    if suffix in (".parquet", ".pq"):
        return parquet_records(path)
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
        import datasets  # only a datasets directory needs it (and it takes a second or more to import)
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


def sources_of(path: Path, split: str) -> list[tuple[str, Records]]:
    """``(file or directory name, records)`` for every part of a data path, in order."""
    if path.is_file():
        return [(str(path), _file_records(path))]
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _saved_dataset(path, split)
        return _shards(path, split)
    raise DataError(f"data file {str(path)!r} does not exist: check the path (or use 'synthetic:<task>')")


__all__ = [
    "BAD_ROW_MODES",
    "BadRow",
    "BadRows",
    "DataReport",
    "FILE_SUFFIXES",
    "HELD_OUT_SPLITS",
    "MAX_LOGGED_BAD_ROWS",
    "Records",
    "jsonl_records",
    "parquet_records",
    "sources_of",
]
