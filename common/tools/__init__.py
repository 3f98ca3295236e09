"""Tools a model can call in the middle of a response: the call formats, the built-in tools
(``calculator``, ``python``), user tools and a concurrent runner. Pure Python: no torch, ray or vllm.

The sampler's side, per path whose segment ended in a call::

    tools = resolve_tools(["calculator", "python"])        # once (ConfigError on a bad spec)
    runner = ToolRunner(tools)
    stops = stop_strings("qwen")                            # engine stop strings, kept in the output
    call = parse_tool_call(segment_text, "qwen")            # None: the text ends in no call
    future = runner.submit(call)                            # poll future.done() between engine steps
    chat = ChatObservation.from_tokenizer(tokenizer)        # once, for the qwen format
    observation = render_observation(future.result().text, "qwen", chat)  # appended to the path

The user guide is docs/tools.md.
"""

from common.tools.calculator import calculator
from common.tools.calls import (
    FORMATS,
    TINY_FORMAT_CHARS,
    ChatObservation,
    ToolCall,
    format_qwen_call,
    format_tiny_call,
    parse_tool_call,
    render_observation,
    stop_strings,
)
from common.tools.registry import BUILTINS, Tool, resolve_tool, resolve_tools
from common.tools.runner import ToolResult, ToolRunner, execute, truncate
from common.tools.sandbox import PythonSandbox, SandboxLimits

__all__ = [
    "BUILTINS",
    "FORMATS",
    "TINY_FORMAT_CHARS",
    "ChatObservation",
    "PythonSandbox",
    "SandboxLimits",
    "Tool",
    "ToolCall",
    "ToolResult",
    "ToolRunner",
    "calculator",
    "execute",
    "format_qwen_call",
    "format_tiny_call",
    "parse_tool_call",
    "render_observation",
    "resolve_tool",
    "resolve_tools",
    "stop_strings",
    "truncate",
]
