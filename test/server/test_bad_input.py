"""Bad input gets HTTP 400 naming the problem, and the server keeps serving."""

from __future__ import annotations

from typing import Any

import pytest
import requests

GOOD = {"text": "Hello", "sampling_params": {"max_new_tokens": 2}}


@pytest.mark.parametrize(("body", "expected"), [
    ("{not json", "JSON"),
    ("", "empty"),
    ([1, 2], "JSON object"),
    ({}, "text or input_ids"),
    ({"text": 7}, "text"),
    ({"text": ""}, "empty"),
    ({"text": "hi", "input_ids": [1]}, "exactly one"),
    ({"input_ids": [1, 2, 49152]}, "vocabulary"),
    ({"input_ids": [-1]}, "vocabulary"),
    ({"input_ids": ["a"]}, "input_ids"),
    ({"text": "hi " * 9000}, "more than the maximum"),
    ({"text": "hi", "sampling_params": {"temperature": -0.5}}, "temperature"),
    ({"text": "hi", "sampling_params": {"top_p": 1.5}}, "top_p"),
    # NaN != NaN once read as "conflicting values" for the parameter.
    ('{"text": "hi", "sampling_params": {"temperature": NaN}}', "finite"),
    ({"text": "hi", "sampling_params": {"top_k": 0}}, "top_k"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": "10"}}, "max_new_tokens"),
    ({"text": "hi", "sampling_params": {"n": 0}}, "n must be in"),
    ({"text": "hi", "sampling_params": {"n": 129}}, "n must be in"),
    ({"text": ["a", "b"], "sampling_params": [{"n": 2}, {"n": 3}]}, "n must be the same"),
    # each sample alone is within the top-logprob budget, all 128 together are not
    ({"text": "hi", "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 40000,
      "sampling_params": {"n": 128, "max_new_tokens": 8}}, "samples"),
    ({"text": "hi", "sampling_params": {"stop_token_ids": [10 ** 9]}}, "stop_token_ids"),
    ({"text": "hi", "sampling_params": {"not_a_param": 1}}, "not_a_param"),
    ({"text": "hi", "sampling_params": []}, "sampling_params"),
    ({"text": "hi", "stream": "yes"}, "stream"),
    ({"text": "hi", "return_logprob": True, "logprob_start_len": 99}, "logprob_start_len"),
    ({"text": "hi", "top_logprobs_num": -2}, "top_logprobs_num"),
    ({"text": ["a", "b"], "sampling_params": [{}]}, "sampling_params"),
    # A full-vocabulary top over a long prompt: GBs of Python objects (the server ran out of
    # host memory); small tops over long prompts are fine (test_native_api).
    ({"input_ids": [5] * 4000, "return_logprob": True, "logprob_start_len": 0,
      "top_logprobs_num": 49152, "sampling_params": {"max_new_tokens": 0}}, "top_logprobs_num"),
    # json.loads raised RecursionError, and a 500-deep custom_params failed to pickle: HTTP 500.
    ('{"text": "hi", "x": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
    ('{"text": "hi", "sampling_params": {"custom_params": {"a": ' + "[" * 500 + "]" * 500
     + "}}}", "custom_params"),
])
def test_bad_generate_gets_400_then_server_still_serves(url: str, body: Any,
                                                        expected: str) -> None:
    if isinstance(body, str):
        r = requests.post(url + "/generate", data=body, timeout=30)
    else:
        r = requests.post(url + "/generate", json=body, timeout=30)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert expected in message
    ok = requests.post(url + "/generate", json=GOOD, timeout=60)
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 2


def test_bad_streaming_request_fails_before_streaming(url: str) -> None:
    r = requests.post(url + "/generate", json={"text": "", "stream": True}, timeout=30)
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]


def test_bad_control_requests(url: str) -> None:
    r = requests.post(url + "/abort_request", json={"rid": 5}, timeout=10)
    assert r.status_code == 400 and "rid" in r.json()["error"]["message"]
    assert requests.get(url + "/no_such_endpoint", timeout=10).status_code == 404


def test_duplicate_rid_is_rejected(url: str) -> None:
    body = {"text": ["a", "b"], "rid": ["same", "same"], "sampling_params": {"max_new_tokens": 1}}
    r = requests.post(url + "/generate", json=body, timeout=30)
    assert r.status_code == 400 and "unique" in r.json()["error"]["message"]


CHAT = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("kwargs", [{"messages": []}, {"add_generation_prompt": False},
                                    {"tokenize": True}])
def test_chat_template_kwargs_cannot_override_the_servers_arguments(url: str, kwargs: Any
                                                                    ) -> None:
    """A key the server passes to apply_chat_template itself (``messages`` was a TypeError:
    HTTP 500)."""
    body = {"messages": CHAT, "chat_template_kwargs": kwargs}
    r = requests.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert "chat_template_kwargs must not set " + next(iter(kwargs)) in \
        r.json()["error"]["message"]


@pytest.mark.parametrize(("path", "body"), [
    ("/generate", '{"text": "a\\ud800", "sampling_params": {"max_new_tokens": 1}}'),
    ("/generate", '{"text": "hi", "rid": "\\udfff", "sampling_params": {"max_new_tokens": 1}}'),
    ("/v1/completions", '{"prompt": "\\ud800", "max_tokens": 1}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}'),
])
def test_unpaired_surrogate_escape_gets_400(url: str, path: str, body: str) -> None:
    """json.loads keeps an unpaired surrogate; the tokenizer (or the UTF-8 response encoder,
    for an echoed rid) then failed with HTTP 500."""
    r = requests.post(url + path, data=body, timeout=30)
    assert r.status_code == 400, r.text
    assert "surrogate" in r.json()["error"]["message"]
    ok = requests.post(url + "/generate", json=GOOD, timeout=60)
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 2


def test_paired_surrogate_escape_is_text(url: str) -> None:
    body = '{"text": "Smile \\ud83d\\ude00", "sampling_params": {"max_new_tokens": 1}}'
    r = requests.post(url + "/generate", data=body, timeout=60)
    assert r.status_code == 200, r.text


BIASED_ID = 3000  # an ordinary BPE token of SmolLM2's vocabulary


def test_native_logit_bias_forces_the_token(url: str) -> None:
    body = {"text": "The capital of France is", "return_logprob": True,
            "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
    plain = requests.post(url + "/generate", json=body, timeout=60).json()
    body["sampling_params"]["logit_bias"] = {str(BIASED_ID): 100}
    r = requests.post(url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    ids = [t[1] for t in r.json()["meta_info"]["output_token_logprobs"]]
    assert ids == [BIASED_ID, BIASED_ID]
    assert [t[1] for t in plain["meta_info"]["output_token_logprobs"]][0] != BIASED_ID
    body["sampling_params"]["logit_bias"] = {"49152": 1.0}  # past the vocabulary
    r = requests.post(url + "/generate", json=body, timeout=30)
    assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_openai_logit_bias_steers_and_bad_keys_get_400(url: str, path: str) -> None:
    """logit_bias is applied (it was once silently ignored): +100 on a token makes greedy
    decoding produce it, -100 on the greedy token changes the answer; a key that is not a
    token id is a 400."""
    body: dict[str, Any] = {"prompt": "Hi"} if path == "/v1/completions" else {"messages": CHAT}
    body.update(max_tokens=1, temperature=0, logprobs=True)
    if path == "/v1/completions":
        body["logprobs"] = 1

    def first_token(extra: dict[str, Any]) -> str:
        r = requests.post(url + path, json={**body, **extra}, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        if path == "/v1/completions":
            return choice["logprobs"]["tokens"][0]
        return choice["logprobs"]["content"][0]["token"]

    plain = first_token({})
    assert first_token({"logit_bias": {}}) == plain
    forced = first_token({"logit_bias": {str(BIASED_ID): 100}})
    assert forced != plain
    assert first_token({"logit_bias": {str(BIASED_ID): 100, "0": -1}}) == forced
    r = requests.post(url + path, json={**body, "logit_bias": {"eleven": 5}}, timeout=30)
    assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"], r.text
