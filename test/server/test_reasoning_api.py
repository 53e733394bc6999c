"""Reasoning content through the ``openai`` client. The test server runs with
``--reasoning-parser qwen3``; a regex makes SmolLM2 write a <think> part before its answer."""

from __future__ import annotations

import json
from typing import Any

import openai

ASK = [{"role": "user", "content": "What is 2 + 2?"}]
THOUGHT = r"<think>\nI add the two numbers\.\n</think>\n\nIt is 4\."


def ask(client: openai.OpenAI, **extra: Any) -> Any:
    return client.chat.completions.create(model="m", messages=ASK, max_tokens=48, temperature=0,
                                          **extra)


def test_reasoning_content_is_split_from_the_answer(client: openai.OpenAI) -> None:
    message = ask(client, extra_body={"regex": THOUGHT}).choices[0].message
    assert message.reasoning_content == "I add the two numbers."
    assert message.content == "It is 4."
    whole = ask(client, extra_body={"regex": THOUGHT, "separate_reasoning": False})
    assert whole.choices[0].message.content.startswith("<think>")
    assert whole.choices[0].message.reasoning_content is None
    plain = ask(client)  # SmolLM2 does not think on its own
    assert plain.choices[0].message.reasoning_content is None and plain.choices[0].message.content


def test_reasoning_streams_as_its_own_delta(client: openai.OpenAI) -> None:
    chunks = list(ask(client, stream=True, extra_body={"regex": THOUGHT}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert reasoning.strip() == "I add the two numbers." and content == "It is 4."
    # the reasoning comes first: no content delta before the last reasoning delta
    kinds = ["r" if getattr(d, "reasoning_content", None) else "c" for d in deltas if
             getattr(d, "reasoning_content", None) or d.content]
    assert kinds == sorted(kinds, reverse=True)


def test_reasoning_then_a_tool_call(client: openai.OpenAI) -> None:
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    regex = (r"<think>I need the weather\.</think>\n<tool_call>\n"
             r'\{"name": "get_weather", "arguments": \{"city": "Oslo"\}\}\n</tool_call>')
    choice = ask(client, tools=[weather], extra_body={"regex": regex}).choices[0]
    assert choice.message.reasoning_content == "I need the weather."
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Oslo"}
