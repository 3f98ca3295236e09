"""Final-answer extraction shared by the sampler (is this path answered?), the rewards and the tasks:
the content of the LAST complete ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces allowed. A box
that never closes (a response cut off mid-answer) is no answer; an earlier complete one still is."""

from __future__ import annotations

import re

_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _match_brace(text: str, open_idx: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_idx``; escaped braces (``\\{``) do not count."""
    depth = 0
    i = open_idx
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2  # skip the escaped character: ``\{`` / ``\}`` are literal braces, ``\\`` a newline
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces allowed), or None."""
    found: str | None = None
    for m in _BOX_START.finditer(text):
        end = _match_brace(text, m.end() - 1)
        if end is not None:
            found = text[m.end() : end]
    return found
