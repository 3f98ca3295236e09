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

Synthetic ``synthetic:<task>`` specs are resolved to files elsewhere (common.tasks); this package
only reads paths.

Modules: :mod:`common.data.files` (reading files, directories and shards; the bad-row policy),
:mod:`common.data.rows` (checking rows, :func:`load_rows`, row metadata on the wire),
:mod:`common.data.templates` (plain and chat templates, :func:`encode_rows`) and
:mod:`common.data.prompt_sets` (data specs, mixtures, :func:`load_prompt_set`).
"""

from __future__ import annotations

from common.data.files import BadRow, DataReport
from common.data.prompt_sets import (
    load_prompt_set,
    load_prompts,
    mix_prompts,
    mixture_counts,
    resolve_data_path,
)
from common.data.rows import PromptRow, PromptRows, dig, full_metadata, load_rows, wire_metadata
from common.data.templates import EncodedPrompt, EncodedRows, encode_rows, format_prompt

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
