"""Prompt sets: a data spec (a path or ``synthetic:<task>``) resolved, loaded and encoded, and several
files mixed by weight (:func:`load_prompt_set`, the one entry point for a run's prompts). The rules
are in :mod:`common.data` (Mixtures).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.config import DataConfig
from common.data.files import DataReport
from common.data.rows import load_rows
from common.data.templates import EncodedPrompt, EncodedRows, encode_rows
from common.errors import DataError
from common.tasks import get_task, synthetic_path

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Specs, mixtures, and the one entry point for a run's prompts
# --------------------------------------------------------------------------------------------------


def resolve_data_path(spec: str, split: str, cfg: DataConfig) -> tuple[Path, str | None]:
    """``(path, task)`` for a data spec: a file or dataset directory (task None) or ``synthetic:<task>``
    (the task's ``split`` written once into the cache, sized and seeded by the DataConfig ``cfg``)."""
    if spec.startswith("synthetic:"):
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


def _load_encoded(
    path: Path, split: str, tokenizer: Any, cfg: DataConfig, first_rows: int = 0
) -> EncodedRows:
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


def load_prompts(
    path: str | os.PathLike, tokenizer: Any, cfg: DataConfig, split: str = "train"
) -> EncodedRows:
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

    full, rest = divmod(n, len(prompts))
    out = [(p, c) for c in range(full) for p in prompts]
    if rest:
        pick = np.sort(np.random.default_rng([int(seed), int(index)]).permutation(len(prompts))[:rest])
        out += [(prompts[int(i)], full) for i in pick]
    return out


def mix_prompts(
    parts: Sequence[EncodedRows], labels: Sequence[str], weights: Sequence[float], seed: int
) -> EncodedRows:
    """One list from several files' prompts (:mod:`common.data`: Mixtures)."""
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
    spec: str | Sequence[str], split: str, tokenizer: Any, cfg: DataConfig, *, first_rows: int = 0
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


__all__ = [
    "load_prompt_set",
    "load_prompts",
    "mix_prompts",
    "mixture_counts",
    "resolve_data_path",
]
