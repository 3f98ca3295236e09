"""The pure verifier: the boxed-answer check (exact fast paths, then math-verify) and DAPO's overlong
penalty. No processes, no deadline: :mod:`common.rewards.pool` runs :func:`verify_boxed` in a worker
with one. The rules are in :mod:`common.rewards`.
"""

from __future__ import annotations

import logging
import re
from typing import Any


def overlong_penalty(response_len: int, max_response_tokens: int, overlong_buffer: int) -> float:
    """DAPO soft overlong penalty in [-1, 0]: ``-(len - (Lmax - buf)) / buf`` past ``Lmax - buf``."""
    if overlong_buffer <= 0:
        return 0.0
    start = max_response_tokens - overlong_buffer
    if response_len <= start:
        return 0.0
    return -min(1.0, (response_len - start) / overlong_buffer)


_WS = re.compile(r"\s+")
_PLAIN_INT = re.compile(r"[+-]?[0-9]+")


def _norm(s: str) -> str:
    return _WS.sub("", s).strip("$")


def strip_period(pred: str) -> str:
    """``\\boxed{5.}`` means 5, but math-verify parses ``5.`` to nothing: drop one final period."""
    p = pred.rstrip()
    return p[:-1] if p.endswith(".") and not p.endswith("..") else pred


def fast_math(pred: str, gold: str) -> bool | None:
    """Decide without math-verify when it is exact and obvious; None = ask math-verify."""
    p, g = _norm(pred), _norm(gold)
    if not p:
        return False
    if p == g:
        return True
    if _PLAIN_INT.fullmatch(p) and _PLAIN_INT.fullmatch(g):
        return int(p) == int(g)
    return None


# --------------------------------------------------------------------------------------------------
# math-verify, as run inside a worker (or in-process when isolation is off)
# --------------------------------------------------------------------------------------------------

_MV: dict[str, Any] = {}


def load_math_verify() -> dict[str, Any]:
    if not _MV:  # on first use: sympy takes seconds to import, and a pool's parent never needs it
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

        _MV.update(
            parse=parse,
            verify=verify,
            gold_cfg=[LatexExtractionConfig(), ExprExtractionConfig()],
            pred_cfg=[LatexExtractionConfig(boxed_match_priority=0)],
        )
        # math-verify warns once that its timeout is disabled: the deadline is ours (worker kill).
        logging.getLogger("math_verify").setLevel(logging.ERROR)
    return _MV


def verify_boxed(pred: str, gold: str) -> bool:
    """math-verify a boxed answer's content against the gold answer (no timeout: run it isolated)."""
    mv = load_math_verify()
    parse, verify = mv["parse"], mv["verify"]
    gold = gold.strip()
    candidates = [gold] if ("$" in gold or "\\boxed" in gold) else [f"${gold}$"]
    candidates += [f"\\boxed{{{gold}}}", gold]
    gold_parsed: list = []
    for cand in candidates:
        gold_parsed = parse(cand, extraction_config=mv["gold_cfg"], parsing_timeout=None)
        if gold_parsed:
            break
    if not gold_parsed:
        return False
    pred_parsed = parse(f"\\boxed{{{pred}}}", extraction_config=mv["pred_cfg"], parsing_timeout=None)
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


__all__ = [
    "fast_math",
    "load_math_verify",
    "overlong_penalty",
    "strip_period",
    "verify_boxed",
]
