"""Constrained decoding through the Engine: outputs always match their regex / validate
against their JSON schema, greedy and sampled, alone and batched with unconstrained
requests, under retraction and with every KV policy; invalid grammars queue nothing.

The default model (SmolLM2-135M) checks real outputs; a tiny random-weight Llama with the
same tokenizer checks that the grammar holds whatever the model wants to write.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest

from sglang_chelsea import Engine
from utils.runtime import assert_no_leak, random_ids

IP = r"((25[0-5]|2[0-4]\d|[01]?\d\d?)\.){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)"
IP_PROMPT = "Q: What is the IP address of the Google DNS servers?\nA: "
CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        "country": {"type": "string", "enum": ["France", "Germany", "Italy", "Other"]},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 16},
                      "maxItems": 2},
    },
    "required": ["name", "population", "country", "landmarks"],
    "additionalProperties": False,
}
CITY_PROMPT = "Describe the city of Paris as a JSON object:\n"
SEEDS = (1, 2, 3)


def assert_city(text: str) -> None:
    """``text`` is a JSON object valid under CITY."""
    obj = json.loads(text)
    assert set(obj) == set(CITY["required"]), text
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 24, text
    assert isinstance(obj["population"], int) and 0 <= obj["population"] <= 100000000, text
    assert obj["country"] in CITY["properties"]["country"]["enum"], text
    assert isinstance(obj["landmarks"], list) and len(obj["landmarks"]) <= 2, text
    assert all(isinstance(x, str) and len(x) <= 16 for x in obj["landmarks"]), text


def assert_ip(out: dict[str, Any]) -> None:
    assert re.fullmatch(IP, out["text"]), out["text"]
    assert out["meta_info"]["finish_reason"]["type"] == "stop", out["meta_info"]


@pytest.fixture(scope="module")
def engine(default_model_path: str) -> Iterator[Any]:
    e = Engine(model_path=default_model_path, max_total_tokens=4096, log_level="warning")
    yield e
    e.shutdown()


def sampled(seed: int, **extra: Any) -> dict[str, Any]:
    return {"temperature": 1.0, "seed": seed, **extra}


def test_regex_constrains_greedy_and_sampled_outputs(engine: Any) -> None:
    params = [{"regex": IP, "temperature": 0, "max_new_tokens": 24}] + \
        [sampled(s, regex=IP, max_new_tokens=24) for s in SEEDS]
    outs = engine.generate([IP_PROMPT] * len(params), sampling_params=params)
    for out in outs:
        assert_ip(out)
    assert_no_leak(engine)


def test_json_schema_constrains_greedy_and_sampled_outputs(engine: Any) -> None:
    params = [{"json_schema": json.dumps(CITY), "temperature": 0, "max_new_tokens": 96}] + \
        [sampled(s, json_schema=CITY, max_new_tokens=96) for s in SEEDS]
    outs = engine.generate([CITY_PROMPT] * len(params), sampling_params=params)
    for out in outs:
        assert_city(out["text"])
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out["meta_info"]
    assert_no_leak(engine)


def test_ebnf_and_a_complete_number(engine: Any) -> None:
    out = engine.generate("Is the sky blue? Answer:", sampling_params={
        "ebnf": 'root ::= " yes" | " no"', "temperature": 0})
    assert out["text"] in (" yes", " no")
    # The model wants " hours" after "24": the grammar ends the number there (it does not
    # extend it to "240..."), as SGLang's gen_int programs expect.
    out = engine.generate("The number of hours in a day is ", sampling_params={
        "regex": r"[-+]?[0-9]+[ \n]*", "temperature": 0, "max_new_tokens": 16})
    assert out["text"].strip() == "24", out


def test_constrained_and_free_requests_in_one_batch(engine: Any) -> None:
    free = {"temperature": 0, "max_new_tokens": 12}
    alone = engine.generate("The capital of France is", sampling_params=free)
    outs = engine.generate(
        [IP_PROMPT, "The capital of France is", CITY_PROMPT, "The capital of France is"],
        sampling_params=[{"regex": IP, "temperature": 0}, free,
                         sampled(7, json_schema=CITY, max_new_tokens=96),
                         sampled(7, max_new_tokens=12)])
    assert_ip(outs[0])
    assert outs[1]["output_ids"] == alone["output_ids"]  # no mask leaks onto free rows
    assert_city(outs[2]["text"])
    assert outs[3]["meta_info"]["completion_tokens"] == 12
    assert_no_leak(engine)


def test_invalid_grammar_queues_nothing(engine: Any) -> None:
    with pytest.raises(ValueError, match="invalid regex"):
        engine.generate(["fine", "bad"], sampling_params=[{}, {"regex": "(unclosed"}])
    with pytest.raises(ValueError, match="invalid json_schema"):
        engine.generate("x", sampling_params={"json_schema": {"type": "nope"}})
    with pytest.raises(ValueError, match="only one of regex, json_schema, ebnf"):
        engine.generate("x", sampling_params={"regex": "a", "json_schema": "{}"})
    assert not engine.scheduler.has_work()
    assert_no_leak(engine)


# ---------------------------------------------------------------------- random weights
DIGITS = r"[0-9]{3}-[a-z]{2,5}( [a-z]+)?"


@pytest.mark.parametrize("kv", [{"kv_compression": "none"},
                                {"kv_compression": "chelsea", "chelsea_chunk_size": 16},
                                {"kv_compression": "streaming", "streaming_window": 16},
                                {"kv_compression": "snapkv", "chelsea_chunk_size": 16,
                                 "snapkv_budget": 16, "snapkv_window": 8}])
def test_grammar_holds_for_a_random_model_with_every_kv_policy(tiny_llama_dir: str,
                                                               kv: dict[str, Any]) -> None:
    engine = Engine(model_path=tiny_llama_dir, max_total_tokens=4096, log_level="warning",
                    **kv)
    prompts = [random_ids(n, seed=n) for n in (40, 70)]
    params = [{"regex": DIGITS, "temperature": 0, "max_new_tokens": 40},
              sampled(3, json_schema=CITY, max_new_tokens=120)]
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    assert re.fullmatch(DIGITS, outs[0]["text"]), outs[0]["text"]
    if outs[1]["meta_info"]["finish_reason"]["type"] == "stop":
        assert_city(outs[1]["text"])
    else:  # a random model may not finish the object in time: a valid prefix then
        assert outs[1]["text"].startswith('{"name":"'), outs[1]["text"]
    assert_no_leak(engine)


def test_retracted_requests_keep_their_grammar_in_step(tiny_llama_dir: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Retraction re-prefills generated tokens without feeding them to the matcher again
    (the sampler asserts the matcher has seen each token once): same outputs as without."""
    prompts = [random_ids(n, seed=500 + n) for n in (40, 52, 45, 60)]
    params = {"regex": r"[a-z]+( [a-z]+){3,}", "temperature": 0, "max_new_tokens": 32,
              "ignore_eos": True}
    plain = Engine(model_path=tiny_llama_dir, max_total_tokens=4096, log_level="warning")
    expected = [plain.generate(input_ids=p, sampling_params=params)["text"] for p in prompts]
    small = Engine(model_path=tiny_llama_dir, max_total_tokens=60 + 32 + 8,
                   log_level="warning")
    with caplog.at_level(logging.INFO, logger="sglang_chelsea.managers.scheduler"):
        outs = small.generate(input_ids=prompts, sampling_params=params)
    assert any(r.getMessage().startswith("Retracted request") for r in caplog.records)
    assert [o["text"] for o in outs] == expected
    for text in expected:
        assert re.fullmatch(params["regex"], text), text
    assert_no_leak(small)
