"""Tool calls in sampled text: finding a call at the end of a segment, and the text of its result.

A segment that ends in a tool call stops right after the call's closing string (:func:`stop_strings`,
given to the engine as stop strings kept in the output); :func:`parse_tool_call` reads the call from
the end of the text, and the tool's result is appended to the path as observation tokens, rendered by
:func:`render_observation`. Two formats:

- ``qwen`` (Qwen2.5's chat template)::

      <tool_call>
      {"name": "calculator", "arguments": {"expression": "12*34"}}
      </tool_call>

  The JSON may be on one line; ``arguments`` may also be a JSON string holding the object (some models
  write it so). The result is a ``tool`` turn of the model's own chat template
  (:class:`ChatObservation`); for Qwen2.5 that is
  ``<|im_end|>\\n<|im_start|>user\\n<tool_response>\\n...\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n``.
- ``tiny`` (for the character-level tiny models, whose alphabet is small): ``[calc 12*34]`` calls the
  tool ``calc`` with the text between the first space and the closing ``]`` as its one argument, and
  the result follows as ``=> 408\\n``. A call is one line; it is complete when ``]`` is sampled.

A text that does not END in a call parses to None. A call that ends the text but cannot be read
(malformed JSON, no tool name) parses to a :class:`ToolCall` with ``error`` set: running it gives the
observation ``error: ...``, so the model sees what it got wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from common.errors import ConfigError

FORMATS = ("qwen", "tiny")
QWEN_OPEN, QWEN_CLOSE = "<tool_call>", "</tool_call>"
TINY_OPEN, TINY_CLOSE, TINY_RESULT = "[", "]", "=> "
# The characters the tiny format adds to a tokenizer's alphabet (beside the tool names and arguments).
TINY_FORMAT_CHARS = "[]=> \n"
# The key under which the tiny format passes its one free-text argument: the tool's first parameter.
TEXT_ARGUMENT = "_"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class ToolCall:
    """One call: the tool's ``name``, its keyword ``arguments`` and the ``raw`` text of the call (from its
    opening string to its closing one). ``error`` is set when the call could not be read; running such
    a call gives ``error: <error>``."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    raw: str = ""
    error: str | None = None


def check_format(fmt: str) -> str:
    """``fmt`` when it is a known format; ConfigError naming the known ones otherwise."""
    if fmt not in FORMATS:
        raise ConfigError(f"tool-call format {fmt!r} is unknown: use one of {', '.join(FORMATS)}")
    return fmt


def stop_strings(fmt: str) -> tuple[str, ...]:
    """The strings that end a call in ``fmt``: stop strings for the engine (kept in the output), so a
    segment ends right after a call."""
    return (QWEN_CLOSE,) if check_format(fmt) == "qwen" else (TINY_CLOSE,)


def parse_tool_call(text: str, fmt: str) -> ToolCall | None:
    """The call that ``text`` ends in (trailing whitespace ignored), or None when it ends in none."""
    if check_format(fmt) == "qwen":
        return _parse_qwen(text)
    return _parse_tiny(text)


def _parse_qwen(text: str) -> ToolCall | None:
    body = text.rstrip()
    if not body.endswith(QWEN_CLOSE):
        return None
    start = body.rfind(QWEN_OPEN, 0, len(body) - len(QWEN_CLOSE))
    if start < 0:
        raw = body[-len(QWEN_CLOSE) :]
        return ToolCall("", {}, raw, f"{QWEN_CLOSE} without {QWEN_OPEN} before it")
    raw = body[start:]
    inner = raw[len(QWEN_OPEN) : -len(QWEN_CLOSE)].strip()
    try:
        obj = json.loads(inner)
    except json.JSONDecodeError as e:
        return ToolCall("", {}, raw, f"the call is not valid JSON ({e.msg} at character {e.pos})")
    return _qwen_call(obj, raw)


def _qwen_call(obj: Any, raw: str) -> ToolCall:
    usage = 'write {"name": "<tool>", "arguments": {...}}'
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return ToolCall("", {}, raw, f"the call has no tool name: {usage}")
    name, arguments = obj["name"], obj.get("arguments", {})
    if isinstance(arguments, str):  # arguments written as a JSON string of the object
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return ToolCall(name, {}, raw, f"the arguments are not a JSON object: {usage}")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return ToolCall(name, {}, raw, f"the arguments are not a JSON object: {usage}")
    return ToolCall(name, arguments, raw)


def _parse_tiny(text: str) -> ToolCall | None:
    body = text.rstrip()
    if not body.endswith(TINY_CLOSE):
        return None
    start = body.rfind(TINY_OPEN, 0, len(body) - 1)
    line_start = body.rfind("\n", 0, len(body) - 1)
    if start < 0 or start < line_start or TINY_CLOSE in body[start:-1]:
        return None  # a "]" that closes no call on its line
    raw = body[start:]
    name, _, argument = raw[1:-1].partition(" ")
    if not _NAME.fullmatch(name):
        return ToolCall("", {}, raw, "the call has no tool name: write [<tool> <argument>]")
    return ToolCall(name, {TEXT_ARGUMENT: argument}, raw)


def format_tiny_call(name: str, argument: str) -> str:
    """The tiny format's text of a call (the inverse of :func:`parse_tool_call`)."""
    return f"{TINY_OPEN}{name} {argument}{TINY_CLOSE}"


def format_qwen_call(name: str, arguments: dict[str, Any]) -> str:
    """The qwen format's text of a call, as Qwen2.5's chat template writes it."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{QWEN_OPEN}\n{body}\n{QWEN_CLOSE}"


def render_observation(result: str, fmt: str, chat: ChatObservation | None = None) -> str:
    """The text that follows a call in ``fmt``: ``=> result\\n`` (tiny) or the chat template's tool turn
    and the next assistant header (qwen; ``chat`` built once from the tokenizer)."""
    if check_format(fmt) == "tiny":
        return f"{TINY_RESULT}{result}\n"
    if chat is None:
        raise ConfigError(
            "the qwen tool-call format renders results with the model's chat template: pass "
            "chat=ChatObservation.from_tokenizer(tokenizer)"
        )
    return chat.render(result)


# A tool result no real one equals: marks where the template puts the result.
_PLACEHOLDER = "\x00treepo-tool-result\x00"


@dataclass(frozen=True)
class ChatObservation:
    """The observation text of a chat template around a tool result: ``head + result + tail``.

    Built once per tokenizer (:meth:`from_tokenizer`): the template renders an assistant turn that
    calls a tool followed by a ``tool`` message (and the generation prompt); ``head`` is what follows
    the assistant's call (the end of its turn, the tool turn's opening), ``tail`` what follows the
    result (the tool turn's end, the next assistant header)."""

    head: str
    tail: str

    def render(self, result: str) -> str:
        return f"{self.head}{result}{self.tail}"

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, call_close: str = QWEN_CLOSE) -> ChatObservation:
        """From a Hugging Face tokenizer with a chat template that renders ``tool_calls`` and ``tool``
        messages; ``call_close`` is the string the template ends a call with."""
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "the tokenizer has no chat template: the qwen tool-call format needs one that renders "
                "tool calls and tool messages (Qwen2.5's does); use the tiny format otherwise"
            )
        text = _render_tool_turn(tokenizer, _PLACEHOLDER)
        at = text.find(_PLACEHOLDER)
        cut = text.rfind(call_close, 0, at) if at >= 0 else -1
        if cut < 0:
            raise ConfigError(
                f"the chat template does not render a tool call ending in {call_close!r} followed by a "
                "tool message's content: it cannot carry tool results (use a template with tool support)"
            )
        cut += len(call_close)
        return cls(text[cut:at], text[at + len(_PLACEHOLDER) :])


def _render_tool_turn(tokenizer: Any, content: str) -> str:
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "1+1"}}}
    messages = [
        {"role": "user", "content": "Compute 1+1."},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "calculator", "content": content},
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


__all__ = [
    "FORMATS",
    "TEXT_ARGUMENT",
    "TINY_FORMAT_CHARS",
    "ChatObservation",
    "ToolCall",
    "check_format",
    "format_qwen_call",
    "format_tiny_call",
    "parse_tool_call",
    "render_observation",
    "stop_strings",
]
