"""Running tool calls concurrently, so that a slow tool does not hold up the others.

The generator submits the calls its segments end in and polls the futures between engine steps::

    runner = ToolRunner(resolve_tools(["calculator", "python"]))
    future = runner.submit(call)           # returns at once
    ...
    if future.done():                      # non-blocking
        result = future.result()           # a ToolResult; never raises
    runner.close()

Every call gives a :class:`ToolResult` whose ``text`` is the tool's result, cut to ``max_chars`` with a
marker; an unknown tool, a call that could not be parsed and every tool failure give ``error: ...``
text. The pool's threads are enough for the built-ins: the python tool's work is a child process and
a user tool runs in a thread of its own under its time limit.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from common.errors import ConfigError
from common.tools.calls import ToolCall
from common.tools.registry import Tool

ERROR_PREFIX = "error: "
DEFAULT_MAX_CHARS = 4096


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one call: the result ``text`` (what the observation carries), whether the tool
    succeeded (``ok``: the text is not ``error: ...``), and the seconds it took."""

    call: ToolCall
    text: str
    ok: bool
    seconds: float


def truncate(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` characters, the cut marked (the marker counted in the limit)."""
    if len(text) <= max_chars:
        return text
    keep = max(0, max_chars - len(f"...[cut {len(text)} chars]"))  # the marker's longest form
    return text[:keep] + f"...[cut {len(text) - keep} chars]"


def execute(tools: Mapping[str, Tool], call: ToolCall, max_chars: int = DEFAULT_MAX_CHARS) -> ToolResult:
    """Run one call in this thread; never raises."""
    start = time.monotonic()
    if call.error is not None:
        text = f"{ERROR_PREFIX}{call.error}"
    elif call.name not in tools:
        known = ", ".join(sorted(tools)) or "none"
        text = f"{ERROR_PREFIX}no tool named {call.name!r} (tools: {known})"
    else:
        try:
            text = tools[call.name].run(call.arguments)
        except Exception as e:  # a tool's own failure is its result
            text = f"{ERROR_PREFIX}{type(e).__name__}: {e}"
    text = truncate(text, max_chars)
    return ToolResult(call, text, not text.startswith(ERROR_PREFIX), time.monotonic() - start)


class ToolRunner:
    """A thread pool running tool calls: :meth:`submit` returns a future at once (poll it with
    ``done()``, read it with ``result()``), :meth:`run_many` waits for a batch; :meth:`close` ends it."""

    def __init__(
        self, tools: Mapping[str, Tool], *, max_workers: int = 4, max_chars: int = DEFAULT_MAX_CHARS
    ):
        if max_workers < 1:
            raise ConfigError(f"tool runner max_workers={max_workers}: it must be >= 1")
        if max_chars < 32:
            raise ConfigError(f"tool runner max_chars={max_chars}: it must be >= 32 characters")
        self.tools = dict(tools)
        self.max_chars = max_chars
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tool-runner")

    def submit(self, call: ToolCall) -> Future[ToolResult]:
        """Start ``call``; its future's ``result()`` is a :class:`ToolResult` (it never raises)."""
        return self._pool.submit(execute, self.tools, call, self.max_chars)

    def run(self, call: ToolCall) -> ToolResult:
        """Run ``call`` and wait for its result."""
        return self.submit(call).result()

    def run_many(self, calls: Iterable[ToolCall]) -> list[ToolResult]:
        """Run ``calls`` concurrently; their results in the same order."""
        futures = [self.submit(call) for call in calls]
        return [f.result() for f in futures]

    def close(self, wait: bool = True) -> None:
        """Stop taking calls; ``wait``: let the running ones finish (queued ones are cancelled)."""
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self) -> ToolRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["DEFAULT_MAX_CHARS", "ERROR_PREFIX", "ToolResult", "ToolRunner", "execute", "truncate"]
