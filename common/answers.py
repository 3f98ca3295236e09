"""Final-answer extraction shared by the sampler (is this path answered?), the rewards and the tasks:
the content of the LAST complete ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces allowed. A box
that never closes (a response cut off mid-answer) is no answer; an earlier complete one still is."""

from __future__ import annotations

import re

_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")


_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.S)  # an escaped character (skipped) or a brace


def _brace_matches(text: str) -> dict[int, int]:
    """Index of the closing ``}`` of every ``{`` that closes, in one pass (linear time); escaped
    characters (``\\{``, ``\\}``, ``\\\\``) are skipped."""
    match: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE_TOKEN.finditer(text):
        c = m.group()
        if c == "{":
            stack.append(m.start())
        elif c == "}" and stack:
            match[stack.pop()] = m.start()
    return match


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces allowed), or None.
    Linear in the text's length: braces are matched once for the whole text."""
    starts = [m.end() - 1 for m in _BOX_START.finditer(text)]
    if not starts:
        return None
    match = _brace_matches(text)
    for open_idx in reversed(starts):
        end = match.get(open_idx)
        if end is not None:
            return text[open_idx + 1 : end]
    return None
