"""GenerateReqInput: parsing /generate bodies into per-prompt items (no model needed)."""

from __future__ import annotations

from typing import Any

import pytest
from sglang_chelsea.managers.generate_request import GenerateReqInput


class _Tok:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_single_text_defaults() -> None:
    obj = GenerateReqInput.from_dict({"text": "hi", "sampling_params": {"max_new_tokens": 3}})
    assert obj.is_single and obj.batch_size == 1
    (item,) = obj.to_items()
    tok = item.tokenize(_Tok())
    assert tok.input_ids == [104, 105]
    assert tok.sampling_params.max_new_tokens == 3
    assert tok.logprob_start_len == -1 and not tok.return_logprob
    assert len(tok.rid) == 32


def test_batch_with_per_item_fields() -> None:
    obj = GenerateReqInput.from_dict({
        "input_ids": [[1, 2], [3]], "rid": ["a", "b"], "return_logprob": [True, False],
        "logprob_start_len": 0, "sampling_params": [{"max_new_tokens": 1}, {"temperature": 0}],
    })
    assert not obj.is_single and obj.batch_size == 2
    a, b = (item.tokenize(_Tok()) for item in obj.to_items())
    assert (a.rid, a.return_logprob, a.logprob_start_len) == ("a", True, 0)
    assert (b.rid, b.return_logprob, b.logprob_start_len) == ("b", False, -1)
    assert b.sampling_params.temperature == 0


def test_router_fields_are_accepted() -> None:
    body = {"text": "x", "model": "m", "log_metrics": True, "background": False,
            "no_logs": False, "return_bytes": False, "return_entropy": False,
            "return_hidden_states": False, "lora_path": None, "return_routed_experts": False,
            "stream_options": {"include_usage": True}, "custom_logit_processor": None,
            "bootstrap_host": None, "bootstrap_room": 3, "data_parallel_rank": None,
            "priority": 1}
    assert GenerateReqInput.from_dict(body).to_items()[0].text == "x"


@pytest.mark.parametrize(("body", "field"), [
    ({}, "text"),
    ({"text": "a", "input_ids": [1]}, "text"),
    ({"text": 3}, "text"),
    ({"text": []}, "text"),
    ({"input_ids": [1, "2"]}, "input_ids"),
    ({"text": "a", "stream": "yes"}, "stream"),
    ({"text": "a", "sampling_params": {"bogus": 1}}, "bogus"),
    ({"text": "a", "sampling_params": 5}, "sampling_params"),
    ({"text": ["a", "b"], "rid": "x"}, "rid"),
    ({"text": ["a", "b"], "rid": ["x", "x"]}, "rid"),
    ({"text": ["a", "b"], "sampling_params": [{}]}, "sampling_params"),
    ({"text": "a", "return_logprob": "yes"}, "return_logprob"),
    ({"text": "a", "top_logprobs_num": -1}, "top_logprobs_num"),
    ({"text": "a", "return_hidden_states": True}, "return_hidden_states"),
    ({"text": "a", "image_data": "x.png"}, "image_data"),
])
def test_bad_bodies_name_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        GenerateReqInput.from_dict(body).to_items()


def test_text_without_a_tokenizer_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="skip-tokenizer-init"):
        GenerateReqInput(text="hello").to_items()[0].tokenize(None)
    item = GenerateReqInput(input_ids=[5, 6, 7]).to_items()[0]
    assert item.tokenize(None).input_ids == [5, 6, 7]


def test_n_samples_expand_prompt_major_and_encode_each_text_once() -> None:
    calls: list[str] = []

    class CountingTok(_Tok):
        def encode(self, text: str) -> list[int]:
            calls.append(text)
            return super().encode(text)

    obj = GenerateReqInput.from_dict({"text": ["ab", "c"], "rid": ["x", "y"],
                                      "sampling_params": {"n": 3, "seed": 5}})
    assert not obj.returns_single and obj.parallel_sample_num == 3
    items = obj.to_items()
    assert [i.rid for i in items] == ["x_0", "x_1", "x_2", "y_0", "y_1", "y_2"]
    assert [i.sampling_params.seed for i in items] == [5, 6, 7, 5, 6, 7]
    assert all(i.sampling_params.n == 1 for i in items)
    encoded: dict[str, list[int]] = {}
    tokenized = [i.tokenize(CountingTok(), encoded) for i in items]
    assert calls == ["ab", "c"]  # each distinct text once
    assert [t.input_ids for t in tokenized] == [[97, 98]] * 3 + [[99]] * 3
    tokenized[0].input_ids.append(0)  # each item has its own list
    assert tokenized[1].input_ids == [97, 98]
