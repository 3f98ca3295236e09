"""Tool specs, user tools and the concurrent runner: a slow tool does not hold up a fast one, user
tools' failures are results, bad specs are errors naming the fix."""

from __future__ import annotations

import textwrap
import time

import pytest

from common.errors import ConfigError
from common.tools import ToolCall, ToolRunner, parse_tool_call, resolve_tool, resolve_tools

USER_TOOLS = '''
import time

def slow(seconds: float = 2.0) -> str:
    time.sleep(seconds)
    return "slow done"

def fast() -> str:
    return "fast done"

def lookup(word: str, upper: bool = False) -> str:
    """A user tool: one text argument (the tiny format's) and an option."""
    return word.upper() if upper else word[::-1]

def fails(x=1):
    raise ValueError(f"bad x={x}")

def number():
    return 3.5

def long_text():
    return "y" * 10_000

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text(textwrap.dedent(USER_TOOLS))
    return path


def test_slow_tool_does_not_hold_up_a_fast_one(user_file):
    tools = resolve_tools([f"{user_file}:slow", f"{user_file}:fast"], timeout_s=5)
    with ToolRunner(tools, max_workers=2) as runner:
        start = time.monotonic()
        slow = runner.submit(ToolCall("slow", {"seconds": 2.0}))
        fast = runner.submit(ToolCall("fast", {}))
        assert fast.result(timeout=1).text == "fast done"
        fast_at = time.monotonic() - start
        assert fast_at < 0.5 and not slow.done()  # polled without blocking
        assert slow.result(timeout=5).text == "slow done"
        slow_at = time.monotonic() - start
    assert slow_at - fast_at > 1.5, (fast_at, slow_at)


def test_run_many_keeps_the_order_and_runs_concurrently(user_file):
    tools = resolve_tools([f"{user_file}:slow", "calculator"], timeout_s=5)
    calls = [ToolCall("slow", {"seconds": 0.5}) for _ in range(3)] + [
        ToolCall("calculator", {"expression": "2+2"})
    ]
    with ToolRunner(tools, max_workers=4) as runner:
        start = time.monotonic()
        results = runner.run_many(calls)
    assert time.monotonic() - start < 1.4  # three 0.5 s calls side by side, not one after another
    assert [r.text for r in results] == ["slow done"] * 3 + ["4"]
    assert all(r.ok and r.seconds >= 0 for r in results)


def test_user_tool_from_a_file(user_file):
    tools = resolve_tools([f"{user_file}:lookup", f"rev={user_file}:lookup"])
    assert set(tools) == {"lookup", "rev"} and tools["lookup"].params == ("word", "upper")
    with ToolRunner(tools) as runner:
        assert runner.run(parse_tool_call("[rev abc]", "tiny")).text == "cba"
        qwen = '<tool_call>\n{"name": "lookup", "arguments": {"word": "abc", "upper": true}}\n</tool_call>'
        assert runner.run(parse_tool_call(qwen, "qwen")).text == "ABC"
        bad = runner.run(ToolCall("lookup", {"colour": "red"}))
        assert not bad.ok and "bad arguments for lookup" in bad.text and "word, upper" in bad.text


def test_user_tool_failures_are_results(user_file):
    specs = [f"{user_file}:{name}" for name in ("fails", "number", "long_text", "slow")]
    with ToolRunner(resolve_tools(specs, timeout_s=0.3), max_chars=100) as runner:
        assert runner.run(ToolCall("fails", {"x": 7})).text == "error: ValueError: bad x=7"
        assert runner.run(ToolCall("number", {})).text == "3.5"
        long = runner.run(ToolCall("long_text", {})).text
        assert (
            len(long) <= 100
            and long.startswith("yyy")
            and long.endswith("chars]")
            and "...[cut 9920 chars]" in long
        )
        start = time.monotonic()
        assert runner.run(ToolCall("slow", {"seconds": 3})).text == "error: timed out after 0.3 s"
        assert time.monotonic() - start < 1
        unknown = runner.run(ToolCall("nope", {}))
        assert unknown.text == "error: no tool named 'nope' (tools: fails, long_text, number, slow)"


def test_module_spec_and_names():
    tool = resolve_tool("common.tools.calculator:calculator")
    assert tool.name == "calculator" and tool.timeout_s is not None  # a user tool: its own thread
    assert resolve_tool("calc=calculator").name == "calc"
    assert resolve_tool(" python ").name == "python"
    assert list(resolve_tools("calculator,python")) == ["calculator", "python"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("calculater", "no built-in tool named 'calculater'"),
        ("", "empty"),
        ("my tool=calculator", "not a tool name"),
        ("{dir}/missing.py:fn", "does not exist; fix the path"),
        ("{dir}/my_tools.py:absent", "has no attribute 'absent'"),
        ("{dir}/my_tools.py:NOT_A_FUNCTION", "point at a callable"),
        ("no_such_package_xyz.mod:fn", "cannot import module"),
        ("{dir}/my_tools.py:", "file.py:function"),
    ],
)
def test_bad_specs_name_the_fix(user_file, spec, message):
    with pytest.raises(ConfigError) as err:
        resolve_tool(spec.format(dir=user_file.parent))
    assert message in str(err.value)


def test_two_tools_of_one_name():
    with pytest.raises(ConfigError, match="rename one with 'name=target'"):
        resolve_tools(["calculator", "calculator"])


def test_runner_settings_are_checked():
    with pytest.raises(ConfigError, match="max_workers"):
        ToolRunner({}, max_workers=0)
    with pytest.raises(ConfigError, match="max_chars"):
        ToolRunner({}, max_chars=1)
