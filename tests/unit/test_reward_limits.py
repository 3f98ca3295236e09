"""Resource limits of answer extraction and reward workers (issue: a quadratic ``last_boxed`` in the
generator; verifier workers without a memory cap)."""

from __future__ import annotations

import time

from common.answers import last_boxed


def _reference(text: str) -> str | None:  # the rule, written the slow obvious way
    import re

    found = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 0, m.end() - 1
        while i < len(text):
            c = text[i]
            if c == "\\":
                i += 2
                continue
            depth += (c == "{") - (c == "}")
            if depth == 0:
                found = text[m.end() : i]
                break
            i += 1
    return found


def test_last_boxed_agrees_with_the_rule_on_tricky_texts():
    cases = [
        r"\boxed{2}", r"a \boxed{1} b \boxed{2", r"\boxed{\frac{1}{2}}", r"\fbox {x}", r"\boxed{a\}b}",
        r"\\boxed{3}", r"{ \boxed{4} }", r"\boxed{ { }", r"\boxed{5}\boxed{", "no box", r"\boxed{}",
        r"\boxed{\\}", r"x\boxed{a{b}c}\fbox{d}", "\\boxed{1}\\",
    ]  # fmt: skip
    for text in cases:
        assert last_boxed(text) == _reference(text), text


def test_last_boxed_is_linear_on_adversarial_text():
    """Unclosed boxes and open braces: the old per-box rescan took 0.77 s on 14 KB (quadratic); 1 MB
    would take about an hour. Linear, it is well under a second; the bound leaves a wide margin."""
    text = "\\boxed{" * 150_000  # ~1 MB, no box ever closes
    t0 = time.perf_counter()
    assert last_boxed(text) is None
    assert last_boxed(text + "}" * 3 + "\\boxed{7}") == "7"
    assert time.perf_counter() - t0 < 20
