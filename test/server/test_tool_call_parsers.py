"""Tool-call parsing without a server: each parser's format, the stream splitter, the JSON
schema of a forced tool choice and the checks of tools / tool_choice."""

from __future__ import annotations

import json
from typing import Any

import llguidance
import pytest

from sglang_chelsea.constrained.grammar_backend import byte_tokenizer
from sglang_chelsea.entrypoints.tool_calls import (
    ToolCallStream,
    ToolMode,
    check_tools,
    forced_calls_schema,
    make_parser,
    split_tool_calls,
    template_messages,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def calls_of(text: str, parser: str) -> tuple[str, list[tuple[str, Any]]]:
    content, calls = make_parser(parser).parse(text)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("parser", ["qwen25", "hermes"])
def test_hermes_format(parser: str) -> None:
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert calls_of(one, parser) == ("", [("get_weather", {"city": "Paris"})])
    two = ('Let me check. ' + one + '\n<tool_call>{"name": "get_time", "arguments": "{}"}'
           '</tool_call>')
    assert calls_of(two, parser) == ("Let me check.", [("get_weather", {"city": "Paris"}),
                                                       ("get_time", {})])
    # cut short before the closing tag: the JSON is complete, so the call stands
    assert calls_of(one[: -len("</tool_call>")], parser)[1] == [("get_weather", {"city": "Paris"})]
    for text in ("The weather is fine.", '<tool_call>{"name": "get_weather", "argu',
                 '<tool_call>{"arguments": {}}</tool_call>', "<tool_call>[1, 2]</tool_call>"):
        assert calls_of(text, parser) == (text, [])  # no well-formed call: all of it is text


def test_llama3_format() -> None:
    assert calls_of('{"name": "get_weather", "parameters": {"city": "Oslo"}}', "llama3") == \
        ("", [("get_weather", {"city": "Oslo"})])
    text = ('<|python_tag|>{"name": "get_time", "parameters": {}}; '
            '{"name": "get_weather", "parameters": {"city": "a;b"}}')
    assert calls_of(text, "llama3") == ("", [("get_time", {}), ("get_weather", {"city": "a;b"})])
    assert calls_of("Sure: {}", "llama3") == ("Sure: {}", [])  # JSON not at the start
    assert calls_of('{"name": "x", "parameters": {}} and more', "llama3")[1] == []


def test_mistral_format() -> None:
    text = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}]'
    assert calls_of(text, "mistral") == ("", [("get_weather", {"city": "Rome"})])
    # the control token skipped by the detokenizer: the array alone at the start
    assert calls_of(text[len("[TOOL_CALLS] "):], "mistral")[1] == [("get_weather",
                                                                    {"city": "Rome"})]
    assert calls_of("[1, 2] is a list", "mistral") == ("[1, 2] is a list", [])


def test_unknown_parser_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown tool call parser 'foo'"):
        make_parser("foo")
    assert make_parser(None) is None


NAMES = frozenset({"get_weather", "get_time"})


def mode(parser: str | None, forced: bool = False) -> ToolMode:
    return ToolMode(make_parser(parser) if parser else None, forced, NAMES)


def stream_pieces(text: str, parser: str | None, forced: bool = False, step: int = 1
                  ) -> tuple[str, str, list[Any]]:
    """Feed ``text`` ``step`` characters at a time: (content sent while streaming, content
    sent at the end, calls)."""
    splitter = ToolCallStream(mode(parser, forced))
    sent = "".join(splitter.feed(text[i:i + step]) for i in range(0, len(text), step))
    rest, calls = splitter.finish()
    return sent, rest, [(c.name, json.loads(c.arguments)) for c in calls]


def test_stream_sends_the_content_and_keeps_the_calls() -> None:
    call = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    for step in (1, 3, 100):
        # the content equals the non-streamed one: the space before the call is not sent
        assert stream_pieces("Checking <now>. " + call, "qwen25", step=step) == \
            ("Checking <now>.", "", [("get_time", {})])
        assert split_tool_calls("Checking <now>. " + call, mode("qwen25"))[0] == "Checking <now>."
        assert stream_pieces("a  b \n", "qwen25", step=step) == ("a  b", " \n", [])
    # A marker's beginning is held back until it is decided; text without calls all arrives.
    splitter = ToolCallStream(mode("qwen25"))
    assert splitter.feed("a <tool") == "a"
    assert splitter.feed("s>") == " <tools>"
    assert stream_pieces("x <tool_call>{bad json", "qwen25") == ("x", " <tool_call>{bad json", [])
    splitter = ToolCallStream(mode("llama3"))
    assert splitter.feed("  ") == ""  # a leading call may still follow the whitespace
    assert splitter.feed("hi {") == "  hi {"
    assert splitter.feed(" ") == "" and splitter.feed("x") == " x"
    assert stream_pieces(' {"name": "get_time", "parameters": {}}', "llama3", step=2) == \
        ("", "", [("get_time", {})])
    assert stream_pieces("plain", None) == ("plain", "", [])
    forced = '[{"name": "get_time", "parameters": {}}]'
    assert stream_pieces(forced, None, forced=True) == ("", "", [("get_time", {})])
    assert stream_pieces('[{"name": "get_ti', None, forced=True) == \
        ("", '[{"name": "get_ti', [])  # cut short (length): the text is the content


def test_calls_of_unknown_functions_are_dropped() -> None:
    """As SGLang does: a call of a function not in the request's tools is not returned; with
    no known call left the output is text."""
    text = ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>')
    assert [c.name for c in split_tool_calls(text, mode("qwen25"))[1]] == ["get_time"]
    only_unknown = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    assert split_tool_calls(only_unknown, mode("qwen25")) == (only_unknown, [])
    assert stream_pieces("a " + only_unknown, "qwen25", step=4) == ("a", " " + only_unknown, [])


def test_too_deep_json_is_not_a_call() -> None:
    """JSON nested past the recursion limit is text, not an exception (it was a 500)."""
    deep = "<tool_call>" + "[" * 5000
    assert split_tool_calls(deep, mode("qwen25")) == (deep, [])
    assert split_tool_calls("[" * 5000, mode(None, True)) == ("[" * 5000, [])
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[" * 5000}}
    assert template_messages([{"role": "assistant", "tool_calls": [call]}])[0]["tool_calls"] == \
        [call]


def test_split_of_a_forced_output() -> None:
    content, calls = split_tool_calls('[{"name": "get_weather", "parameters": {"city": "Nice"}},'
                                      ' {"name": "get_time", "parameters": {}}]', mode(None, True))
    assert content == "" and [c.name for c in calls] == ["get_weather", "get_time"]
    assert calls[0].to_openai(0)["index"] == 0 and calls[0].to_openai()["type"] == "function"
    assert json.loads(calls[0].to_openai()["function"]["arguments"]) == {"city": "Nice"}


def test_forced_schema_admits_exactly_the_tools_calls() -> None:
    """The schema, compiled by llguidance, accepts a call of a given tool with valid
    parameters and rejects another name, missing parameters and an empty array."""
    tok = byte_tokenizer()

    def accepts(schema: dict[str, Any], text: str) -> bool:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        return matcher.consume_tokens(list(text.encode())) and matcher.is_accepting()

    required = forced_calls_schema([WEATHER, TIME], None)
    assert accepts(required, '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, '
                             '{"name": "get_time", "parameters": {}}]')
    assert not accepts(required, '[{"name": "get_date", "parameters": {}}]')
    assert not accepts(required, '[{"name": "get_weather", "parameters": {}}]')
    assert not accepts(required, "[]")
    assert not accepts(required, '[{"name": "get_time", "parameters": {}, "note": 1}]')
    named = forced_calls_schema([WEATHER, TIME], "get_time")
    assert accepts(named, '[{"name": "get_time", "parameters": {}}]')
    assert not accepts(named, '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]')
    assert not accepts(named, '[{"name": "get_time", "parameters": {}}, '
                              '{"name": "get_time", "parameters": {}}]')
    assert forced_calls_schema([WEATHER, TIME], None, single=True)["maxItems"] == 1
    # $defs move to the root, where the parameters' local $refs point
    unit = {"type": "function", "function": {"name": "get_temp", "parameters": {
        "type": "object", "$defs": {"U": {"type": "string", "enum": ["C", "F"]}},
        "properties": {"unit": {"$ref": "#/$defs/U"}}, "required": ["unit"]}}}
    with_defs = forced_calls_schema([WEATHER, unit], "get_temp")
    assert with_defs["$defs"] == {"U": {"type": "string", "enum": ["C", "F"]}}
    assert accepts(with_defs, '[{"name": "get_temp", "parameters": {"unit": "F"}}]')
    assert not accepts(with_defs, '[{"name": "get_temp", "parameters": {"unit": "K"}}]')
    other = {"type": "function", "function": {"name": "get_x", "parameters": {
        "type": "object", "$defs": {"U": {"type": "integer"}}, "properties": {}}}}
    with pytest.raises(ValueError, match="define \\$defs/U differently"):
        forced_calls_schema([unit, other], None)


@pytest.mark.parametrize("tools,choice,message", [
    ([{"type": "function"}], "auto", r"tools\[0\] must be"),
    ([{"type": "retrieval", "function": {"name": "x"}}], "auto", r"tools\[0\] must be"),
    ([{"function": {"name": "x", "parameters": [1]}}], "auto", "parameters must be a JSON"),
    ([{"function": {"name": "x", "parameters": {"type": "string"}}}], "auto",
     "parameters must be a JSON schema of an object"),
    ([WEATHER], {"type": "retrieval", "function": {"name": "get_weather"}}, "tool_choice must be"),
    ([], "required", "needs tools"),
    ([WEATHER], "any", "tool_choice must be"),
    ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, "not in tools"),
])
def test_bad_tools_and_tool_choice(tools: list[Any], choice: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_tools(tools, choice)


def test_check_tools_names_the_forced_function() -> None:
    assert check_tools([WEATHER, TIME], {"type": "function",
                                         "function": {"name": "get_time"}}) == "get_time"
    assert check_tools([WEATHER], "auto") is None and check_tools([], None) is None


def test_template_messages_give_call_arguments_as_objects() -> None:
    messages = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "not json"}}]},
        {"role": "tool", "content": "12 C", "tool_call_id": "c1"}]
    out = template_messages(messages)
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert out[0]["tool_calls"][1]["function"]["arguments"] == "not json"
    assert out[1] == messages[1]
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'  # a copy
