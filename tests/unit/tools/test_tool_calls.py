"""Tool calls at the end of sampled text, in the qwen and tiny formats, and the observation text that
follows them (the qwen one from a chat template, through a locally built Qwen2.5-like tokenizer)."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from common.tools import (
    ChatObservation,
    ToolCall,
    ToolRunner,
    format_qwen_call,
    format_tiny_call,
    parse_tool_call,
    render_observation,
    resolve_tools,
    stop_strings,
)
from common.tools.calls import TEXT_ARGUMENT

QWEN25_TOOL_TURN = (
    "<|im_end|>\n<|im_start|>user\n<tool_response>\n408\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
)


# --------------------------------------------------------------------------------------------------
# qwen


def test_qwen_call_multi_line_and_one_line():
    multi = 'Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*34"}}\n</tool_call>'
    one = '<tool_call>{"name": "calculator", "arguments": {"expression": "12*34"}}</tool_call>'
    for text in (multi, one):
        call = parse_tool_call(text, "qwen")
        assert call == ToolCall("calculator", {"expression": "12*34"}, text[text.index("<tool_call>") :])
        assert call.error is None


def test_qwen_call_must_end_the_text():
    call = '<tool_call>\n{"name": "calculator", "arguments": {}}\n</tool_call>'
    assert parse_tool_call("no call here", "qwen") is None
    assert parse_tool_call(call + " and then more text", "qwen") is None
    assert parse_tool_call('<tool_call>\n{"name": "calculator"', "qwen") is None  # not closed yet
    assert parse_tool_call(call + "\n", "qwen").name == "calculator"  # trailing whitespace is fine


def test_qwen_last_of_two_calls_is_read():
    text = (
        format_qwen_call("python", {"code": "1"}) + "\n" + format_qwen_call("calculator", {"expression": "2"})
    )
    assert parse_tool_call(text, "qwen").name == "calculator"


def test_qwen_arguments_as_a_json_string():
    text = '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"1+2\\"}"}</tool_call>'
    assert parse_tool_call(text, "qwen").arguments == {"expression": "1+2"}


@pytest.mark.parametrize(
    "inner, reason",
    [
        ('{"name": "calculator", "arguments": {"expression": "1+2"}', "not valid JSON"),
        ("calculator(1+2)", "not valid JSON"),
        ('{"arguments": {}}', "no tool name"),
        ('["calculator"]', "no tool name"),
        ('{"name": "calculator", "arguments": [1, 2]}', "not a JSON object"),
    ],
)
def test_malformed_qwen_call_gives_an_error_result(inner, reason):
    call = parse_tool_call(f"<tool_call>\n{inner}\n</tool_call>", "qwen")
    assert call is not None and reason in call.error
    with ToolRunner(resolve_tools(["calculator"])) as runner:
        result = runner.run(call)
    assert not result.ok and result.text.startswith("error: ") and reason in result.text


def test_closing_tag_without_an_opening_one():
    call = parse_tool_call("text </tool_call>", "qwen")
    assert call.error and "without <tool_call>" in call.error


def test_qwen_round_trip_through_the_tokenizer(qwen_tokenizer):
    tok = qwen_tokenizer
    for tag in ("<tool_call>", "</tool_call>", "<|im_start|>", "<|im_end|>"):
        assert len(tok.encode(tag, add_special_tokens=False)) == 1, tag
    text = "I will use the calculator.\n" + format_qwen_call("calculator", {"expression": "12*34"})
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(tok.convert_tokens_to_ids("<tool_call>")) == 1
    decoded = tok.decode(ids, skip_special_tokens=True)  # the tool tags are not special: they stay
    assert parse_tool_call(decoded, "qwen") == parse_tool_call(text, "qwen")
    assert parse_tool_call(decoded, "qwen").arguments == {"expression": "12*34"}


def test_the_template_writes_calls_as_the_format_does(qwen_tokenizer):
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12*34"}}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    text = qwen_tokenizer.apply_chat_template(messages, tokenize=False)
    assert format_qwen_call("calculator", {"expression": "12*34"}) in text


def test_observation_from_the_chat_template(qwen_tokenizer):
    chat = ChatObservation.from_tokenizer(qwen_tokenizer)
    assert render_observation("408", "qwen", chat) == QWEN25_TOOL_TURN
    # the observation continues the sampled call exactly as the template renders the whole conversation
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12*34"}}}
    messages = [
        {"role": "user", "content": "What is 12*34?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "408"},
    ]
    full = qwen_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert full.endswith(QWEN25_TOOL_TURN)
    assert full[: -len(QWEN25_TOOL_TURN)].endswith(format_qwen_call("calculator", {"expression": "12*34"}))
    ids = qwen_tokenizer.encode(chat.render("408"), add_special_tokens=False)
    assert ids[0] == qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_observation_needs_a_template_with_tool_support(plain_chat_tokenizer):
    with pytest.raises(ConfigError, match="cannot carry tool results"):
        ChatObservation.from_tokenizer(plain_chat_tokenizer)
    with pytest.raises(ConfigError, match="pass chat="):
        render_observation("1", "qwen")


# --------------------------------------------------------------------------------------------------
# tiny


def test_tiny_call_round_trip():
    text = "Compute 12*34.\n" + format_tiny_call("calc", "12*34")
    call = parse_tool_call(text, "tiny")
    assert call == ToolCall("calc", {TEXT_ARGUMENT: "12*34"}, "[calc 12*34]")
    assert format_tiny_call(call.name, call.arguments[TEXT_ARGUMENT]) == call.raw
    assert render_observation("408", "tiny") == "=> 408\n"
    assert parse_tool_call(text + render_observation("408", "tiny"), "tiny") is None  # answered


@pytest.mark.parametrize(
    "text", ["[calc 1+2", "[calc 1+2] and more", "a ] b", "[calc 1\n+2]", "[calc 1]]", "plain text"]
)
def test_tiny_text_that_does_not_end_in_a_call(text):
    assert parse_tool_call(text, "tiny") is None


def test_tiny_call_without_a_name_is_an_error():
    for text in ("[ 12]", "[12 34]", "[]"):
        call = parse_tool_call(text, "tiny")
        assert call is not None and "no tool name" in call.error, text


def test_tiny_argument_goes_to_the_first_parameter():
    with ToolRunner(resolve_tools(["calc=calculator"])) as runner:
        assert runner.run(parse_tool_call("7*6=[calc 7*6]", "tiny")).text == "42"


def test_stop_strings_and_formats():
    assert stop_strings("qwen") == ("</tool_call>",)
    assert stop_strings("tiny") == ("]",)
    with pytest.raises(ConfigError, match="qwen, tiny"):
        stop_strings("hermes")
    with pytest.raises(ConfigError, match="unknown"):
        parse_tool_call("[calc 1]", "json")
