"""Structured outputs over HTTP: /generate with regex / json_schema, OpenAI response_format,
400s naming an invalid grammar, and streaming with logprobs as SGLang streams it."""

from __future__ import annotations

import json
import re
from typing import Any

import requests

from utils.http_client import post, stream_events

IP = r"((25[0-5]|2[0-4]\d|[01]?\d\d?)\.){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)"
PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def chat(url: str, **body: Any) -> requests.Response:
    messages = [{"role": "user", "content": "Give me a person as JSON."}]
    return requests.post(url + "/v1/chat/completions", timeout=120,
                         json={"messages": messages, "max_tokens": 64, **body})


def assert_person(text: str) -> None:
    obj = json.loads(text)
    assert set(obj) == {"name", "age"} and isinstance(obj["name"], str), text
    assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 120, text


def test_generate_with_regex_and_json_schema(url: str) -> None:
    outs = post(url, {
        "text": ["The Google DNS server is at ", "A person as JSON: "],
        "sampling_params": [{"regex": IP, "temperature": 0},
                            {"json_schema": PERSON, "temperature": 0.8, "max_new_tokens": 48}],
    }).json()
    assert re.fullmatch(IP, outs[0]["text"]), outs[0]
    assert_person(outs[1]["text"])


def test_invalid_grammar_is_a_400_naming_the_problem(url: str) -> None:
    r = post(url, {"text": "x", "sampling_params": {"regex": "[a-"}})
    assert r.status_code == 400 and "invalid regex" in r.json()["error"]["message"], r.text
    r = post(url, {"text": "x", "sampling_params": {"json_schema": '{"type": 3}'}})
    assert r.status_code == 400 and "invalid json_schema" in r.json()["error"]["message"], r.text
    r = post(url, {"text": "x", "sampling_params": {"regex": "(ab){300000}"}})
    assert r.status_code == 400 and "too complex" in r.json()["error"]["message"], r.text
    r = post(url, {"text": "x", "sampling_params": {"json_schema": "{oops"}})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"], r.text
    r = chat(url, response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert r.status_code == 400 and "json_schema.schema" in r.json()["error"]["message"], r.text
    r = chat(url, response_format={"type": "yaml"})
    assert r.status_code == 400 and "'yaml'" in r.json()["error"]["message"], r.text


def test_chat_response_format(url: str) -> None:
    r = chat(url, response_format={"type": "json_object"}, temperature=0)
    assert r.status_code == 200, r.text
    assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"]), dict)
    r = chat(url, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert_person(choice["message"]["content"])
    assert choice["finish_reason"] == "stop"


def test_stream_sends_new_logprobs_in_each_chunk(url: str) -> None:
    body = {"text": "Once upon a time", "return_logprob": True, "top_logprobs_num": 2,
            "sampling_params": {"max_new_tokens": 10, "temperature": 0}}
    final = post(url, body).json()["meta_info"]
    events = stream_events(url, body)
    assert events[-1] == "[DONE]"
    seen: list[Any] = []
    tops: list[Any] = []
    for event in events[:-1]:
        meta = event["meta_info"]
        seen += meta["output_token_logprobs"]
        tops += meta["output_top_logprobs"]
        assert meta["output_token_logprobs_length"] == meta["completion_tokens"] == len(seen)
    assert len(events) > 3  # streamed token by token
    assert [e[1] for e in seen] == [e[1] for e in final["output_token_logprobs"]]
    assert all(abs(a[0] - b[0]) < 1e-4 for a, b in zip(seen, final["output_token_logprobs"]))
    assert len(tops) == 10 and final["output_token_logprobs_length"] == 10
