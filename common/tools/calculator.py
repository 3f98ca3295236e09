"""The ``calculator`` tool: arithmetic on int and float literals, read with :mod:`ast` (never eval).

Allowed: numbers, ``+ - * / // % **``, unary ``-``/``+`` and parentheses. Everything else (names,
calls, attributes, strings, comparisons) is refused. Sizes are bounded so that no expression can hang
or exhaust memory: the expression is at most :data:`MAX_CHARS` characters, no number (literal,
intermediate or result) may reach ``10**MAX_DIGITS``, and a power is refused before it is computed when
its result would. Every failure is the result text ``error: ...``, never an exception.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

MAX_CHARS = 1000
MAX_DIGITS = 100
_LIMIT = 10**MAX_DIGITS

_BINARY: dict[type, Callable] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class CalcError(ValueError):
    """An expression the calculator refuses (the message is the reason)."""


def calculator(expression: str) -> str:
    """The value of ``expression`` as text (``"408"``, ``"2.5"``), or ``error: <reason>``."""
    try:
        return _format(evaluate(expression))
    except CalcError as e:
        return f"error: {e}"
    except ZeroDivisionError:
        return "error: division by zero"
    except (OverflowError, RecursionError, MemoryError, ValueError) as e:
        return f"error: {type(e).__name__}: {e}"


def evaluate(expression: str) -> int | float:
    """The value of ``expression``; CalcError (or ZeroDivisionError, OverflowError) when refused."""
    if not isinstance(expression, str):
        raise CalcError(f"the expression must be text, not {type(expression).__name__}")
    if len(expression) > MAX_CHARS:
        raise CalcError(f"the expression is longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise CalcError(f"not an arithmetic expression ({e.msg})") from None
    return _eval(tree.body)


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CalcError(f"{value!r:.40} is not a number")
        return _checked(value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _checked(_BINARY[type(node.op)](left, right))
    raise CalcError(f"{_describe(node)} is not allowed: only numbers, + - * / // % ** and parentheses")


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"the name {node.id!r}"
    if isinstance(node, ast.Call):
        return "a function call"
    if isinstance(node, ast.Attribute):
        return "an attribute"
    if isinstance(node, (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare)):
        op = node.op if hasattr(node, "op") else None
        return f"the operator {type(op or node).__name__}"
    return f"a {type(node).__name__}"


def _check_power(base: int | float, exponent: int | float) -> None:
    """Refuse a power whose result would reach the size limit, before computing it."""
    if base == 0:
        if exponent < 0:
            raise ZeroDivisionError
        return
    if exponent * math.log10(abs(base)) >= MAX_DIGITS:
        raise CalcError(f"the result of {base}**{exponent} would have more than {MAX_DIGITS} digits")


def _checked(value: int | float) -> int | float:
    if isinstance(value, float) and not math.isfinite(value):
        raise CalcError("the result is not a finite number")
    if isinstance(value, complex):
        raise CalcError("the result is a complex number")
    if abs(value) >= _LIMIT:
        raise CalcError(f"a number has more than {MAX_DIGITS} digits")
    return value


def _format(value: int | float) -> str:
    return str(value) if isinstance(value, int) else repr(value)


__all__ = ["MAX_CHARS", "MAX_DIGITS", "CalcError", "calculator", "evaluate"]
