"""SGLang's /tokenize and /detokenize (and their /v1/ aliases), and OpenAI's model retrieval."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
import requests
from utils.http_client import post

from sglang_chelsea.entrypoints.tokenize_api import TokenizeServing

PROMPT = "The capital of France is"


def _post(url: str, path: str, body: object) -> requests.Response:
    return requests.post(url + path, json=body, timeout=60)


def test_tokenize_matches_generate_and_round_trips(url: str) -> None:
    out = _post(url, "/tokenize", {"prompt": PROMPT}).json()
    generated = post(url, {"input_ids": out["tokens"],
                           "sampling_params": {"max_new_tokens": 4, "temperature": 0}}).json()
    by_text = post(url, {"text": PROMPT,
                         "sampling_params": {"max_new_tokens": 4, "temperature": 0}}).json()
    assert out["count"] == len(out["tokens"]) == by_text["meta_info"]["prompt_tokens"]
    assert generated["output_ids"] == by_text["output_ids"]
    assert out["max_model_len"] == 8192
    text = _post(url, "/detokenize", {"tokens": out["tokens"]}).json()["text"]
    assert text == PROMPT


def test_batches_and_v1_aliases(url: str) -> None:
    prompts = [PROMPT, "1, 2, 3,", ""]
    out = _post(url, "/v1/tokenize", {"model": "any", "prompt": prompts}).json()
    singles = [_post(url, "/tokenize", {"prompt": p}).json()["tokens"] for p in prompts]
    assert out["tokens"] == singles and out["count"] == [len(s) for s in singles]
    assert out["count"][2] == 0
    texts = _post(url, "/v1/detokenize", {"tokens": singles}).json()["text"]
    assert texts == prompts


def test_special_tokens_flags(url: str) -> None:
    eos = _post(url, "/tokenize", {"prompt": "<|im_end|>", "add_special_tokens": False}).json()
    assert eos["count"] == 1
    ids = _post(url, "/tokenize", {"prompt": "Hi"}).json()["tokens"] + eos["tokens"]
    assert _post(url, "/detokenize", {"tokens": ids}).json()["text"] == "Hi"
    kept = _post(url, "/detokenize", {"tokens": ids, "skip_special_tokens": False}).json()
    assert kept["text"] == "Hi<|im_end|>"


@pytest.mark.parametrize("path, body, message", [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": ["a", 3]}, "prompt"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/detokenize", {"tokens": [1, 2.5]}, "tokens"),
    ("/detokenize", {"tokens": [1, 10 ** 9]}, "outside the vocabulary"),
    ("/detokenize", {"tokens": [[1], [-1]]}, "outside the vocabulary"),
])
def test_bad_bodies_are_400(url: str, path: str, body: object, message: str) -> None:
    r = _post(url, path, body)
    assert r.status_code == 400
    assert message in r.json()["error"]["message"]
    bad_json = requests.post(url + path, data=b"{", timeout=10)
    assert bad_json.status_code == 400


def test_without_a_tokenizer_is_a_clear_400() -> None:
    serving = TokenizeServing(None, vocab_size=100, context_len=64)
    for call, body in ((serving.tokenize, {"prompt": "x"}), (serving.detokenize, {"tokens": [1]})):
        r = asyncio.run(call(body))
        assert r.status_code == 400
        assert "--skip-tokenizer-init" in json.loads(r.body)["error"]["message"]


def test_retrieve_model(client: openai.OpenAI, url: str) -> None:
    listed = client.models.list().data[0]
    got = client.models.retrieve(listed.id)
    assert got.id == listed.id and got.object == "model"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("no-such-model")
