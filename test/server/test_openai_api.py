"""The OpenAI-compatible endpoints through the ``openai`` Python client."""

from __future__ import annotations

import json

import openai
import pytest
import requests

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert len(models) == 1 and models[0].id.endswith(".gguf")
    assert models[0].object == "model"


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    full = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12,
                                          temperature=0)
    choice = full.choices[0]
    assert full.object == "chat.completion" and choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(client.chat.completions.create(
        model=model, messages=QUESTION, max_completion_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == choice.finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        full.usage.completion_tokens


def test_chat_multi_turn_stop_and_logprobs(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Answer briefly."}, *QUESTION,
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": [{"type": "text", "text": "And of Italy?"}]}]
    out = client.chat.completions.create(model="m", messages=messages, max_tokens=8,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    stopped = client.chat.completions.create(model="m", messages=messages, max_tokens=8,
                                             temperature=0, stop=["Rome"])
    assert "Rome" not in stopped.choices[0].message.content


def test_completions(client: openai.OpenAI) -> None:
    out = client.completions.create(model="m", prompt="The capital of France is",
                                    max_tokens=6, temperature=0, logprobs=2)
    choice = out.choices[0]
    assert out.object == "text_completion" and "Paris" in choice.text
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 6
    assert len(choice.logprobs.tokens) == 6 and "".join(choice.logprobs.tokens) == choice.text
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)

    stream = list(client.completions.create(model="m", prompt="The capital of France is",
                                            max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in stream) == choice.text
    assert stream[-1].choices[0].finish_reason == "length"

    batch = client.completions.create(model="m", prompt=["1, 2, 3,", "a, b, c,"],
                                      max_tokens=3, temperature=0, echo=True)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[1].text.startswith("a, b, c,")


def test_streamed_echo_logprobs_offsets_match_non_stream(url: str) -> None:
    """With echo, logprobs cover the prompt's tokens (the first has none) and then the output;
    the first generated token's text offset is after the prompt, streamed too."""
    body = {"prompt": "Hello world", "max_tokens": 3, "temperature": 0, "echo": True,
            "logprobs": 1}
    full = requests.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    plain = requests.post(url + "/v1/completions", json={**body, "echo": False},
                          timeout=60).json()["choices"][0]["logprobs"]
    logprobs = full["logprobs"]
    n_prompt = len(logprobs["tokens"]) - 3
    assert n_prompt >= 2 and logprobs["token_logprobs"][0] is None
    assert logprobs["text_offset"][0] == 0
    assert logprobs["text_offset"][n_prompt] == len("Hello world")
    assert logprobs["tokens"][n_prompt:] == plain["tokens"]
    assert logprobs["token_logprobs"][n_prompt:] == pytest.approx(plain["token_logprobs"],
                                                                  abs=1e-4)
    assert len(logprobs["top_logprobs"]) == len(logprobs["tokens"])
    offsets, tokens, text = [], [], ""
    with requests.post(url + "/v1/completions", json={**body, "stream": True}, stream=True,
                       timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                offsets += choice["logprobs"]["text_offset"]
                tokens += choice["logprobs"]["tokens"]
    assert text == full["text"] and offsets == logprobs["text_offset"]
    assert tokens == logprobs["tokens"]


def test_echo_scores_a_text_with_max_tokens_0(url: str) -> None:
    """lm-eval's loglikelihood request: echo + logprobs + max_tokens 0 returns the prompt's
    token logprobs, the same as /generate's input_token_logprobs."""
    text = "The capital of France is Paris"
    r = requests.post(url + "/v1/completions", json={
        "prompt": text, "max_tokens": 0, "temperature": 0, "echo": True, "logprobs": 1},
        timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == text
    native = requests.post(url + "/generate", json={
        "text": text, "return_logprob": True, "logprob_start_len": 0,
        "sampling_params": {"max_new_tokens": 0}}, timeout=60).json()
    expected = native["meta_info"]["input_token_logprobs"]
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx([e[0] for e in expected[1:]],
                                                                     abs=1e-4)
    assert all(lp < 0 for lp in choice["logprobs"]["token_logprobs"][1:])


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    texts = {client.completions.create(model="m", prompt="Once upon a time", max_tokens=6,
                                       temperature=1.0, seed=1234).choices[0].text
             for _ in range(2)}
    assert len(texts) == 1


def test_bad_requests(client: openai.OpenAI, url: str) -> None:
    with pytest.raises(openai.BadRequestError, match="n must be in"):
        client.chat.completions.create(model="m", messages=QUESTION, n=129)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="m", prompt="x", temperature=-1)
    for body in ({"messages": []}, {"model": "m"}, {"messages": [{"role": "robot"}]},
                 {"messages": QUESTION, "max_tokens": "many"}):
        r = requests.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"]
    r = requests.post(url + "/v1/completions", data="{nope", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = requests.post(url + "/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": [{"type": "text"}]}], "max_tokens": 2})
    assert r.status_code == 400 and "needs a 'text'" in r.json()["error"]["message"]


def test_null_max_tokens_on_completions_is_the_default(url: str) -> None:
    # OpenAI's completions default is 16 tokens; null used to mean "until the context ends".
    body = {"prompt": "Once upon a time", "max_tokens": None, "temperature": 0,
            "stop": [], "ignore_eos": True}
    r = requests.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 16


def test_n_choices_stream_and_not(client: openai.OpenAI) -> None:
    """n samples per prompt: choices 0..n-1 (seed + j each, so they differ and repeat),
    streamed interleaved by index with the same texts; completions are prompt-major."""
    body = dict(model="m", messages=QUESTION, n=3, max_tokens=8, temperature=1.0, seed=7)
    full = client.chat.completions.create(**body)
    assert [c.index for c in full.choices] == [0, 1, 2]
    texts = [c.message.content for c in full.choices]
    assert len(set(texts)) > 1
    chunks = list(client.chat.completions.create(**body, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed: dict[int, str] = {}
    finished: dict[int, str] = {}
    for c in chunks:
        for choice in c.choices:
            assert choice.index not in finished  # nothing after a choice's finish_reason
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert [streamed[i] for i in range(3)] == texts
    assert [finished[i] for i in range(3)] == [c.finish_reason for c in full.choices]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    one = client.chat.completions.create(**{**body, "n": 1})
    assert full.usage.prompt_tokens == chunks[-1].usage.prompt_tokens == one.usage.prompt_tokens

    out = client.completions.create(model="m", prompt=["The sky is", "Two plus two is"], n=2,
                                    max_tokens=4, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text != out.choices[2].text
    assert out.choices[2].text == out.choices[3].text
    one = client.completions.create(model="m", prompt="The sky is", max_tokens=4, temperature=0)
    assert out.choices[0].text == one.choices[0].text
    two = client.completions.create(model="m", prompt="Two plus two is", max_tokens=4,
                                    temperature=0)
    # each prompt counts once in usage, as OpenAI counts it; each choice's tokens count
    assert out.usage.prompt_tokens == one.usage.prompt_tokens + two.usage.prompt_tokens
    assert out.usage.completion_tokens == 2 * (one.usage.completion_tokens
                                               + two.usage.completion_tokens)
