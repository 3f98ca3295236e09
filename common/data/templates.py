"""Templates: a prompt row's token ids under ``plain`` or ``chat`` (:func:`format_prompt`), and
:func:`encode_rows`, which reports a row the template cannot render, or one too long, as a bad row.
The rules are in :mod:`common.data`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

from common.config import Template
from common.data.files import BadRows, DataReport
from common.data.rows import PromptRow
from common.errors import DataError

TEMPLATES = get_args(Template)  # data.template


@dataclass
class EncodedPrompt:
    row: PromptRow
    prompt_ids: list[int]


class EncodedRows(list):
    """``list[EncodedPrompt]`` with the encoding report attached (``.report``)."""

    report: DataReport


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
    bad = BadRows(source, bad_rows)
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


__all__ = [
    "EncodedPrompt",
    "EncodedRows",
    "TEMPLATES",
    "encode_rows",
    "format_prompt",
]
