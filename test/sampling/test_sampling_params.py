"""SamplingParams: parsing from JSON, normalization and validation messages."""

from __future__ import annotations

from typing import Any

import pytest
from sglang_chelsea.sampling.sampling_params import SamplingParams

VOCAB = 100


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("inf")),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", 0),
        ("top_k", -2),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("max_new_tokens", -1),
        ("min_new_tokens", -1),
        ("min_new_tokens", 200),  # > max_new_tokens (128)
        ("frequency_penalty", 2.5),
        ("presence_penalty", -2.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 2.1),
        ("n", 0),
        ("stop_token_ids", [VOCAB]),
        ("stop_token_ids", [-1]),
        ("max_new_tokens", "5"),
        ("temperature", True),
        ("top_k", 1.5),
        ("ignore_eos", 1),
        ("stop", 3),
        ("seed", "7"),
    ],
)
def test_verify_names_the_field(name: str, value: Any) -> None:
    params = SamplingParams(**{name: value})
    with pytest.raises(ValueError, match=name):
        params.verify(VOCAB)


@pytest.mark.parametrize(
    ("name", "value"),
    [("max_new_tokens", "5"), ("temperature", False), ("top_p", "0.5"), ("top_k", 2.5),
     ("stop", [1, 2]), ("stop_token_ids", "2"), ("skip_special_tokens", "yes"),
     ("regex", 5), ("custom_params", [1])],
)
def test_from_dict_rejects_wrong_types_naming_the_field(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=name):
        SamplingParams.from_dict({name: value})


def test_defaults_verify() -> None:
    params = SamplingParams.from_dict({})
    params.verify(VOCAB)
    assert params.max_new_tokens == 128 and params.top_k == -1 and params.stop_strs == []


def test_from_dict_converts_int_valued_floats_and_nulls() -> None:
    params = SamplingParams.from_dict(
        {"max_new_tokens": 5.0, "top_k": 3.0, "temperature": 0, "top_p": None, "seed": 7.0}
    )
    assert params.max_new_tokens == 5 and isinstance(params.max_new_tokens, int)
    assert params.top_k == 3 and isinstance(params.top_k, int)
    assert params.temperature == 0.0 and isinstance(params.temperature, float)
    assert params.top_p == 1.0  # null keeps the default
    assert params.seed == 7
    params.verify(VOCAB)


@pytest.mark.parametrize("key", ["xyz", "max_tokens", "stop_strs"])
def test_from_dict_rejects_unknown_names(key: str) -> None:
    with pytest.raises(ValueError, match=f"unknown sampling parameter '{key}'"):
        SamplingParams.from_dict({key: 1})


def test_from_dict_sglang_only_names() -> None:
    assert SamplingParams.from_dict({"sampling_seed": 3}).seed == 3
    with pytest.raises(ValueError, match="seed"):
        SamplingParams.from_dict({"seed": 1, "sampling_seed": 2})
    SamplingParams.from_dict({"stream_interval": 4, "logit_bias": None, "stop_regex": []})
    with pytest.raises(ValueError, match="structural_tag"):
        SamplingParams.from_dict({"structural_tag": {"format": "x"}})
    with pytest.raises(ValueError, match="sampling_params"):
        SamplingParams.from_dict([1])


def test_normalize_stop_fields() -> None:
    params = SamplingParams(stop="END")
    params.normalize()
    assert params.stop_strs == ["END"] and params.stop_token_ids == []
    params = SamplingParams.from_dict({"stop": ["a", "", "b"], "stop_token_ids": [5, 3, 5]})
    assert params.stop_strs == ["a", "b"]
    assert params.stop_token_ids == [5, 3]
    params.normalize()  # idempotent
    assert params.stop_strs == ["a", "b"] and params.stop == ["a", "", "b"]


def test_greedy_and_zero_new_tokens_are_valid() -> None:
    params = SamplingParams.from_dict({"temperature": 0, "max_new_tokens": 0})
    params.verify(VOCAB)
    assert params.is_greedy()
    assert SamplingParams(top_k=1).is_greedy()
    assert not SamplingParams(temperature=0.5).is_greedy()


def test_only_one_grammar() -> None:
    params = SamplingParams.from_dict({"regex": "a+", "json_schema": "{}"})
    with pytest.raises(ValueError, match="regex"):
        params.verify(VOCAB)


def test_logit_bias_is_parsed_and_checked() -> None:
    p = SamplingParams.from_dict({"logit_bias": {"5": 1.5, 7: -100, "05": 0.5}})
    p.verify(vocab_size=10)
    assert p.logit_bias == {"5": 2.0, "7": -100.0}  # "05" is id 5: biases add up
    assert SamplingParams.from_dict({"logit_bias": {}}).logit_bias is None
    for bad, match in [({"x": 1.0}, "token ids"), ({"5": "high"}, "number"),
                       ({"5": float("inf")}, "finite"), ([5], "object")]:
        with pytest.raises(ValueError, match=match):
            SamplingParams.from_dict({"logit_bias": bad})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams.from_dict({"logit_bias": {"10": 1.0}}).verify(vocab_size=10)
