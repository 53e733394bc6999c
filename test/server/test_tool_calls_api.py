"""Function calling through the ``openai`` client: tool_choice named / required (the
constrained JSON array of calls), auto with the server's ``--tool-call-parser qwen25``
(the model's output steered by a regex into that format), none, and bad requests."""

from __future__ import annotations

import json
import re
from typing import Any

import openai
import pytest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HERMES_CALL = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "Paris", "unit": "C"\}\}\n</tool_call>'


def assert_weather_call(call: Any) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("C", "F")
    assert isinstance(args["city"], str) and len(args["city"]) <= 12


def test_named_tool_choice_returns_a_valid_call(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="m", messages=ASK, tools=[WEATHER, TIME], max_tokens=64, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    assert_weather_call(choice.message.tool_calls[0])


def test_required_tool_choice_streamed(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
        max_tokens=96, temperature=0.7, seed=3, stream=True, parallel_tool_calls=False))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.content for d in deltas)  # the JSON array is not sent as content
    calls = [t for d in deltas for t in (d.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0
    assert calls[0].function.name in ("get_weather", "get_time")
    if calls[0].function.name == "get_weather":
        assert_weather_call(calls[0])
    else:
        assert json.loads(calls[0].function.arguments) == {}
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "tool_calls" and not any(finishes[:-1])


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_the_models_own_format(client: openai.OpenAI, stream: bool) -> None:
    """The server runs with --tool-call-parser qwen25; a regex makes the model write a
    sentence and then a call in that format."""
    body: dict[str, Any] = dict(model="m", messages=ASK, tools=[WEATHER], max_tokens=80,
                                temperature=0, extra_body={"regex": "Checking\\. " + HERMES_CALL})
    if not stream:
        message = client.chat.completions.create(**body).choices[0]
        assert message.finish_reason == "tool_calls"
        content, calls = message.message.content, message.message.tool_calls
    else:
        chunks = list(client.chat.completions.create(**body, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        content = "".join(d.content or "" for d in deltas)
        calls = [t for d in deltas for t in (d.tool_calls or [])]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert content.strip() == "Checking." and "<tool_call>" not in content
    assert len(calls) == 1 and json.loads(calls[0].function.arguments) == {"city": "Paris",
                                                                            "unit": "C"}


def test_tools_without_a_call_and_tool_choice_none(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model="m", messages=ASK, max_tokens=10,
                                           temperature=0)
    for choice in ("auto", "none"):
        out = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER],
                                             tool_choice=choice, max_tokens=10, temperature=0)
        assert out.choices[0].message.tool_calls is None
        assert out.choices[0].finish_reason in ("stop", "length")
        assert out.choices[0].message.content  # the model's text, as without tools
    # "none": the tools are not parsed even when the text has the format
    out = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER],
                                         tool_choice="none", max_tokens=80, temperature=0,
                                         extra_body={"regex": HERMES_CALL})
    assert out.choices[0].message.tool_calls is None
    assert re.fullmatch(HERMES_CALL, out.choices[0].message.content)
    assert plain.choices[0].message.content  # a request without tools is unchanged


def test_a_tool_round_trip_in_the_history(client: openai.OpenAI) -> None:
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    out = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER],
                                         max_tokens=12, temperature=0)
    assert out.choices[0].message.content and out.usage.prompt_tokens > 20


@pytest.mark.parametrize("extra,message", [
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "not in tools"),
    ({"tool_choice": "sometimes"}, "tool_choice must be"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools\\[0\\]"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}},
     "cannot be combined"),
])
def test_bad_tool_requests_are_400s(client: openai.OpenAI, extra: dict[str, Any],
                                    message: str) -> None:
    body = {"model": "m", "messages": ASK, "tools": [WEATHER], "max_tokens": 8, **extra}
    tools = body.pop("tools")
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(tools=tools, **body)
