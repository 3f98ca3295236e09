"""Tool calls as segment boundaries: what the sampler does when a segment ends in a call.

With ``tools`` configured, a segment also ends right after a complete tool call (the format's closing
string, :func:`common.tools.stop_strings`; a call split across segments counts). The path stays live:
the call runs (:class:`common.tools.ToolRunner`, beside the engine's other requests) and its result,
rendered as the format's observation text (``=> 408\\n``, or the chat template's tool turn), is
appended to that segment as observation tokens: never sampled, logprob 0, masked from the loss
(:attr:`common.tree.Segment.observed`). The segment's children continue after the observation, so the
tree branches at a tool boundary exactly as at a length boundary, and siblings share the call and its
result through the tree and the prefix cache.

Bounds: ``tool_use.max_calls`` calls per path (a call past it is answered ``error: ...`` without
running), ``tool_use.max_result_chars`` per result, and the path's ``tree.max_response_tokens``
(an observation that does not fit is cut there and the path ends with ``max_tokens``). A failing tool
never raises here: its failure is its result text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from common.stops import DecodeFn, StopRule
from common.tools import (
    ChatObservation,
    ToolCall,
    ToolResult,
    ToolRunner,
    parse_tool_call,
    render_observation,
    resolve_tools,
    stop_strings,
)

_CALL_CONTEXT_TOKENS = 256  # tokens of a path's tail decoded to read the call that ends it


@dataclass
class ToolTurns:
    """The sampler's tool side: where a call ends a segment, the call, its run and its observation ids."""

    runner: ToolRunner
    fmt: str
    encode: Callable[[str], list[int]]
    decode: DecodeFn
    max_calls: int
    chat: ChatObservation | None = None
    close: StopRule = field(init=False)

    def __post_init__(self) -> None:
        self.close = StopRule.of((), stop_strings(self.fmt))

    @classmethod
    def from_config(cls, cfg: Any, tokenizer: Any, decode: DecodeFn) -> ToolTurns | None:
        """The tool side of a run's config (``tools``, ``tool_use``); None without tools."""
        if not cfg.tools:
            return None
        use = cfg.tool_use
        tools = resolve_tools(list(cfg.tools), timeout_s=use.timeout_s)
        chat = ChatObservation.from_tokenizer(tokenizer) if use.format == "qwen" else None
        runner = ToolRunner(tools, max_workers=use.workers, max_chars=use.max_result_chars)

        def encode(text: str) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=False))

        return cls(runner, use.format, encode, decode, use.max_calls, chat)

    def call_end(self, context: Sequence[int], new: Sequence[int]) -> int | None:
        """Index in ``new`` of the token that completes the first call-closing string after ``context``
        (the path's tail), or None."""
        return self.close.string_end(list(context)[-self.close.context_tokens :], new, self.decode)

    def parse(self, path_ids: Sequence[int]) -> ToolCall | None:
        """The call the path ``path_ids`` (response tokens, ending at a closing string) ends in, or None."""
        return parse_tool_call(self.decode(list(path_ids)[-_CALL_CONTEXT_TOKENS:]), self.fmt)

    def submit(self, call: ToolCall, calls_before: int) -> Future[ToolResult]:
        """Start ``call`` (the path's ``calls_before + 1``-th): over ``max_calls`` it is answered with an
        error at once."""
        if calls_before >= self.max_calls:
            done: Future[ToolResult] = Future()
            text = f"error: the tool-call limit of {self.max_calls} per response is reached; answer now"
            done.set_result(ToolResult(call, text, False, 0.0))
            return done
        return self.runner.submit(call)

    def observation_ids(self, result: ToolResult) -> list[int]:
        """The token ids of ``result`` rendered as the format's observation text."""
        return self.encode(render_observation(result.text, self.fmt, self.chat))
