"""Tools by name: the built-ins and user functions, resolved from specs such as
``[calculator, python, my_tools.py:lookup]``.

A spec is ``[name=]target``:

- ``calculator`` (:mod:`common.tools.calculator`) or ``python`` (:mod:`common.tools.sandbox`);
- ``path/to/file.py:function`` or ``package.module:function``: a user tool, found like a user
  reward function (:func:`common.rewards.user_fns.import_callable`; a relative path is taken from the
  working directory). A user tool is ``fn(**arguments) -> str`` (another return value is turned into
  text with ``str``); it runs in a thread of its own under ``timeout_s``: an exception or a time-out
  is the result ``error: ...``. Python cannot stop a thread, so a tool that overruns is abandoned and
  finishes in the background: write tools that return.

The tool's name (what a call names) is ``name`` when given, else the built-in's name or the function's
name: ``calc=calculator`` lets the tiny format write ``[calc 1+2]``.

A call's arguments are passed by keyword; the tiny format's one free-text argument goes to the tool's
first parameter. Arguments the tool does not take give ``error: ...`` naming its parameters.
"""

from __future__ import annotations

import inspect
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError, RewardError
from common.tools.calculator import calculator
from common.tools.calls import TEXT_ARGUMENT
from common.tools.sandbox import PythonSandbox, SandboxLimits

BUILTINS = ("calculator", "python")
DEFAULT_TIMEOUT_S = 10.0
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_SPEC_HELP = (
    "a tool is a built-in (calculator, python), 'path/to/file.py:function' or 'package.module:function', "
    "optionally named: 'calc=calculator'"
)


@dataclass(frozen=True)
class Tool:
    """A callable tool. ``timeout_s`` None: it runs in the caller's thread (the built-ins bound their
    own time); otherwise in a thread of its own, abandoned after ``timeout_s``."""

    name: str
    fn: Callable[..., Any]
    params: tuple[str, ...]
    timeout_s: float | None = None

    def run(self, arguments: Mapping[str, Any]) -> str:
        """The tool's result for ``arguments`` as text; ``error: ...`` for every failure."""
        kwargs = self.bind(arguments)
        if isinstance(kwargs, str):
            return kwargs
        if self.timeout_s is None:
            return _call(self.fn, kwargs)
        return _call_in_thread(self.name, self.fn, kwargs, self.timeout_s)

    def bind(self, arguments: Mapping[str, Any]) -> dict[str, Any] | str:
        """The keyword arguments of a call, or the ``error: ...`` text when they do not fit."""
        kwargs = dict(arguments)
        if TEXT_ARGUMENT in kwargs and len(kwargs) == 1 and self.params:
            kwargs = {self.params[0]: kwargs[TEXT_ARGUMENT]}
        try:
            inspect.signature(self.fn).bind(**kwargs)
        except TypeError as e:
            return f"error: bad arguments for {self.name} ({e}); it takes {', '.join(self.params) or 'none'}"
        except ValueError:
            pass  # no signature to check: let the call decide
        return kwargs


def _call(fn: Callable[..., Any], kwargs: dict[str, Any]) -> str:
    try:
        value = fn(**kwargs)
    except Exception as e:  # a tool's failure is its result, never the caller's exception
        return f"error: {type(e).__name__}: {e}"
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _call_in_thread(name: str, fn: Callable[..., Any], kwargs: dict[str, Any], timeout_s: float) -> str:
    box: list[str] = []
    worker = threading.Thread(target=lambda: box.append(_call(fn, kwargs)), name=f"tool-{name}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive() or not box:
        return f"error: timed out after {timeout_s:g} s"
    return box[0]


def _params(fn: Callable[..., Any]) -> tuple[str, ...]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in params if p.kind in kinds)


def builtin_tool(name: str, python: SandboxLimits | None = None) -> Tool:
    """The built-in ``calculator`` or ``python`` tool."""
    if name == "calculator":
        return Tool("calculator", calculator, ("expression",))
    if name == "python":
        return Tool("python", PythonSandbox(python), ("code",))
    raise ConfigError(f"tool {name!r}: no built-in tool of that name; {_SPEC_HELP}")


def _load_user_fn(target: str, spec: str) -> Callable[..., Any]:
    from common.rewards.user_fns import import_callable  # only for user tools: it imports the data layer

    module, sep, fn_name = target.rpartition(":")
    if not sep or not module or not fn_name:
        raise ConfigError(f"tool {spec!r} is not a built-in nor 'file.py:function': {_SPEC_HELP}")
    if module.endswith(".py") and not Path(module).expanduser().is_file():
        path = Path(module).expanduser().resolve()
        raise ConfigError(f"tool {spec!r}: file {path} does not exist; fix the path in the tool spec")
    try:
        return import_callable(target)
    except RewardError as e:
        raise ConfigError(f"tool {spec!r} cannot be loaded: {e}") from None


def resolve_tool(
    spec: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, python: SandboxLimits | None = None
) -> Tool:
    """The tool named by ``spec`` (module docstring); ConfigError naming the fix when it cannot be."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"tool spec {spec!r} is empty or not text: {_SPEC_HELP}")
    name, sep, target = spec.strip().partition("=")
    if not sep:
        name, target = "", name
    name, target = name.strip(), target.strip()
    if sep and not _NAME.fullmatch(name):
        raise ConfigError(f"tool {spec!r}: {name!r} is not a tool name (letters, digits, _ . -)")
    if target in BUILTINS:
        tool = builtin_tool(target, python)
    elif ":" not in target:
        raise ConfigError(f"tool {spec!r}: no built-in tool named {target!r}; {_SPEC_HELP}")
    else:
        fn = _load_user_fn(target, spec)
        if not timeout_s > 0:
            raise ConfigError(f"tool timeout_s={timeout_s}: it must be > 0 seconds")
        default = target.rpartition(":")[2].rpartition(".")[2]
        tool = Tool(default, fn, _params(fn), float(timeout_s))
    return Tool(name, tool.fn, tool.params, tool.timeout_s) if name else tool


def resolve_tools(
    specs: Iterable[str], *, timeout_s: float = DEFAULT_TIMEOUT_S, python: SandboxLimits | None = None
) -> dict[str, Tool]:
    """The tools of ``specs`` by name (ConfigError on a bad spec or two tools of one name)."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    tools: dict[str, Tool] = {}
    for spec in specs:
        tool = resolve_tool(spec, timeout_s=timeout_s, python=python)
        if tool.name in tools:
            raise ConfigError(
                f"two tools are named {tool.name!r}: rename one with 'name=target' (e.g. 'calc=calculator')"
            )
        tools[tool.name] = tool
    return tools


__all__ = ["BUILTINS", "DEFAULT_TIMEOUT_S", "Tool", "builtin_tool", "resolve_tool", "resolve_tools"]
