"""Request handling through the Engine: seeded sampling, bad input, context limits,
prefill-only requests and the stop conditions (stop token ids, stop strings, EOS,
min_new_tokens, ignore_eos).

One tiny Llama engine with a 128-token context serves the module; every test ends by
checking that no KV slot or request row leaked.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from sglang_chelsea import Engine
from utils.runtime import assert_no_leak, random_ids
from utils.tiny_models import make_tiny_hf_model

CONTEXT = 128
PROMPT = random_ids(24, seed=11)
GREEDY = {"max_new_tokens": 32, "temperature": 0}


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: str) -> Iterator[Any]:
    e = Engine(model_path=tiny_llama_dir, context_length=CONTEXT, max_total_tokens=1024,
               log_level="warning")
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def greedy_ids(engine: Any) -> list[int]:
    """The 32 greedy tokens after PROMPT."""
    out = engine.generate(input_ids=PROMPT, sampling_params=GREEDY)
    assert len(out["output_ids"]) == 32
    return out["output_ids"]


def first_new_token_index(ids: list[int], start: int = 2) -> int:
    """The first index ``i >= start`` whose token does not occur before it."""
    return next(i for i in range(start, len(ids)) if ids[i] not in ids[:i])


# ---------------------------------------------------------------------- sampling seeds
def test_seeded_sampling_is_reproducible(engine: Any) -> None:
    sampled = {"max_new_tokens": 24, "temperature": 1.0, "top_p": 0.9, "top_k": 200}
    alone = engine.generate(input_ids=PROMPT, sampling_params={**sampled, "seed": 1234})
    again = engine.generate(input_ids=PROMPT, sampling_params={**sampled, "seed": 1234})
    assert again["output_ids"] == alone["output_ids"] and again["text"] == alone["text"]
    assert len(alone["output_ids"]) == 24
    # In a batch with other sampled, seeded and greedy requests (and a radix hit now).
    other = random_ids(40, seed=12)
    outs = engine.generate(
        input_ids=[other, PROMPT, other, PROMPT, PROMPT],
        sampling_params=[{**sampled, "seed": 7}, {**sampled, "seed": 1234}, GREEDY,
                         {**sampled, "seed": 99}, {"max_new_tokens": 24, "temperature": 0.7}])
    assert outs[1]["output_ids"] == alone["output_ids"]
    assert outs[1]["text"] == alone["text"]
    assert outs[3]["output_ids"] != alone["output_ids"]  # another seed, other tokens
    seeded_other = engine.generate(input_ids=other, sampling_params={**sampled, "seed": 7})
    assert seeded_other["output_ids"] == outs[0]["output_ids"]
    # SGLang's alias and a different temperature path (no top-p / top-k).
    plain = {"max_new_tokens": 16, "temperature": 0.8, "sampling_seed": 5}
    a = engine.generate(input_ids=PROMPT, sampling_params=plain)
    b = engine.generate(input_ids=[other, PROMPT], sampling_params=[GREEDY, plain])[1]
    assert a["output_ids"] == b["output_ids"]
    assert_no_leak(engine)


# ---------------------------------------------------------------------- bad input
BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("empty text", {"prompt": ""}, "empty"),
    ("empty ids", {"input_ids": []}, "empty"),
    ("too long", {"input_ids": random_ids(CONTEXT, seed=1)}, "context length"),
    ("too long text", {"prompt": "hello " * 200}, "context length"),
    ("temperature", {"sampling_params": {"temperature": -1}}, "temperature"),
    ("top_p", {"sampling_params": {"top_p": 0}}, "top_p"),
    ("top_k", {"sampling_params": {"top_k": 0}}, "top_k"),
    ("max_new_tokens", {"sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ("unknown param", {"sampling_params": {"temprature": 0.5}}, "temprature"),
    ("min > max", {"sampling_params": {"max_new_tokens": 2, "min_new_tokens": 3}},
     "min_new_tokens"),
    ("stop id", {"sampling_params": {"stop_token_ids": [10**6]}}, "stop_token_ids"),
    ("id too large", {"input_ids": [5, 6, 49152]}, "vocabulary"),
    ("negative id", {"input_ids": [5, -1, 6]}, "vocabulary"),
    ("logprob start", {"input_ids": [5, 6, 7], "return_logprob": True, "logprob_start_len": 3},
     "logprob_start_len"),
]


@pytest.mark.parametrize("kwargs,match", [(k, m) for _, k, m in BAD_REQUESTS],
                         ids=[name for name, _, _ in BAD_REQUESTS])
def test_bad_input_raises_and_engine_keeps_serving(engine: Any, greedy_ids: list[int],
                                                   kwargs: dict[str, Any], match: str) -> None:
    call: dict[str, Any] = {"sampling_params": GREEDY, **kwargs}
    if "prompt" not in call and "input_ids" not in call:
        call["input_ids"] = PROMPT
    with pytest.raises(ValueError, match=match):
        engine.generate(**call)
    assert not engine.scheduler.has_work()
    assert_no_leak(engine)
    # One bad request in a batch: nothing of the batch runs.
    batch: dict[str, Any] = {}
    for key, value in call.items():
        good = {"sampling_params": GREEDY, "prompt": "Hello", "input_ids": PROMPT}.get(key, value)
        batch[key] = [good, value]
    if "prompt" in batch or "input_ids" in batch:
        with pytest.raises(ValueError, match=match):
            engine.generate(**batch)
        assert not engine.scheduler.has_work()
    # A normal request still gets its usual answer.
    assert engine.generate(input_ids=PROMPT, sampling_params=GREEDY)["output_ids"] == greedy_ids
    assert_no_leak(engine)


def test_prompt_at_the_context_limit(engine: Any) -> None:
    info = engine.get_server_info()
    assert info["context_length"] == CONTEXT and info["max_req_input_len"] == CONTEXT - 1
    longest = engine.generate(input_ids=random_ids(CONTEXT - 1, seed=2), sampling_params=GREEDY)
    meta = longest["meta_info"]
    assert meta["prompt_tokens"] == CONTEXT - 1 and meta["completion_tokens"] == 1
    assert meta["finish_reason"]["type"] == "length"
    out = engine.generate(input_ids=random_ids(100, seed=3),
                          sampling_params={"max_new_tokens": 64, "temperature": 0})
    assert out["meta_info"]["completion_tokens"] == CONTEXT - 100
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": CONTEXT - 100}
    assert_no_leak(engine)


def test_a_request_that_outgrows_a_small_pool_ends_with_length(engine: Any,
                                                               tiny_llama_dir: str) -> None:
    """With every token held raw, the pool caps the sequence as SGLang caps max_new_tokens:
    the request finishes ("length") at the pool's size instead of aborting for want of a
    slot, and its tokens are the ones a large pool gives."""
    pool = 80
    e = Engine(model_path=tiny_llama_dir, context_length=CONTEXT, max_total_tokens=pool,
               log_level="warning")
    try:
        assert e.get_server_info()["max_req_input_len"] == pool - 1
        prompt = random_ids(60, seed=5)
        out = e.generate(input_ids=prompt, sampling_params={"max_new_tokens": 64,
                                                            "temperature": 0})
        meta = out["meta_info"]
        assert meta["finish_reason"] == {"type": "length", "length": pool - 60}, meta
        assert meta["completion_tokens"] == pool - 60
        large = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": pool - 60,
                                                                   "temperature": 0})
        assert out["output_ids"] == large["output_ids"]
        assert_no_leak(e)
    finally:
        e.shutdown()


def test_n_samples_per_prompt(engine: Any, greedy_ids: list[int]) -> None:
    """``n`` expands each prompt into n requests, prompt-major, as SGLang returns them."""
    outs = engine.generate(input_ids=PROMPT, sampling_params={**GREEDY, "n": 2})
    assert isinstance(outs, list) and [o["output_ids"] for o in outs] == [greedy_ids] * 2
    other = random_ids(30, seed=12)
    outs = engine.generate(input_ids=[PROMPT, other],
                           sampling_params={"max_new_tokens": 4, "temperature": 0, "n": 2})
    assert len(outs) == 4
    assert outs[0]["output_ids"] == outs[1]["output_ids"] == greedy_ids[:4]
    assert outs[2]["output_ids"] == outs[3]["output_ids"] != greedy_ids[:4]
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [24, 24, 30, 30]
    with pytest.raises(ValueError, match="n must be in"):
        engine.generate(input_ids=PROMPT, sampling_params={"n": 0})
    assert_no_leak(engine)


# ---------------------------------------------------------------------- prefill only, stops
def test_max_new_tokens_zero_is_prefill_only(engine: Any) -> None:
    outs = engine.generate(input_ids=[PROMPT, random_ids(70, seed=4)],
                           sampling_params={"max_new_tokens": 0})
    for out, n in zip(outs, (len(PROMPT), 70)):
        assert out["output_ids"] == [] and out["text"] == ""
        meta = out["meta_info"]
        assert meta["prompt_tokens"] == n and meta["completion_tokens"] == 0
        assert meta["finish_reason"] == {"type": "length", "length": 0}
    assert_no_leak(engine)


def test_stop_token_ids(engine: Any, greedy_ids: list[int]) -> None:
    i = first_new_token_index(greedy_ids)
    stop = greedy_ids[i]
    out = engine.generate(input_ids=PROMPT, sampling_params={**GREEDY, "stop_token_ids": [stop]})
    assert out["output_ids"] == greedy_ids[: i + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["meta_info"]["completion_tokens"] == i + 1
    assert out["text"] == engine.tokenizer.decode(greedy_ids[:i])  # the stop token not shown
    assert_no_leak(engine)


def test_min_new_tokens_defers_stop_tokens(engine: Any, greedy_ids: list[int]) -> None:
    i = first_new_token_index(greedy_ids)
    stop = greedy_ids[i]
    minimum = i + 3
    out = engine.generate(input_ids=PROMPT, sampling_params={
        **GREEDY, "stop_token_ids": [stop], "min_new_tokens": minimum})
    ids = out["output_ids"]
    assert ids[:i] == greedy_ids[:i]  # unchanged until the stop token would come
    assert len(ids) >= minimum and stop not in ids[:minimum]
    reason = out["meta_info"]["finish_reason"]
    if reason["type"] == "stop":
        assert reason["matched"] == stop and ids[-1] == stop and stop not in ids[:-1]
    else:
        assert reason == {"type": "length", "length": 32} and stop not in ids
    assert_no_leak(engine)


def _stop_strings(tokenizer: Any, ids: list[int]) -> tuple[str, str]:
    """A stop string equal to one output token's word, and one spanning two tokens."""
    word = spanning = ""
    for k in range(2, len(ids) - 1):
        piece, nxt = tokenizer.decode([ids[k]]), tokenizer.decode([ids[k + 1]])
        if not word and piece.strip().isalpha() and len(piece.strip()) >= 3:
            word = piece.strip()
        if not spanning and len(piece) >= 2 and len(nxt) >= 2 and not piece[-2:].isspace() \
                and not nxt[:2].isspace() and k >= 4:
            spanning = piece[-2:] + nxt[:2]
    assert word and spanning, "no usable stop strings in the greedy output"
    return word, spanning


def test_stop_strings_trim_the_text(engine: Any, greedy_ids: list[int]) -> None:
    full = engine.tokenizer.decode(greedy_ids)
    for stop in _stop_strings(engine.tokenizer, greedy_ids):
        for stops in (stop, ["\x00never\x00", stop]):
            out = engine.generate(input_ids=PROMPT, sampling_params={**GREEDY, "stop": stops})
            ids = out["output_ids"]
            assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
            assert ids == greedy_ids[: len(ids)] and len(ids) < 32
            assert stop in engine.tokenizer.decode(ids)  # it stopped once the string appeared
            assert stop not in engine.tokenizer.decode(ids[:-1])
            assert out["text"] == full[: full.index(stop)]
    # no_stop_trim keeps the stop string.
    stop = _stop_strings(engine.tokenizer, greedy_ids)[0]
    out = engine.generate(input_ids=PROMPT,
                          sampling_params={**GREEDY, "stop": stop, "no_stop_trim": True})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == engine.tokenizer.decode(out["output_ids"])
    assert out["text"].startswith(full[: full.index(stop) + len(stop)])
    assert_no_leak(engine)


def test_eos_min_new_tokens_and_ignore_eos(engine: Any, greedy_ids: list[int],
                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same weights with one of the greedy tokens declared end-of-sequence."""
    i = first_new_token_index(greedy_ids)
    eos = greedy_ids[i]
    path = make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny_llama_eos")), arch="llama",
                              eos_token_id=eos)
    e = Engine(model_path=path, context_length=CONTEXT, max_total_tokens=1024,
               log_level="warning")
    assert e.scheduler.eos_token_ids == [eos]
    out = e.generate(input_ids=PROMPT, sampling_params=GREEDY)
    assert out["output_ids"] == greedy_ids[: i + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}
    assert out["text"] == e.tokenizer.decode(greedy_ids[:i])

    out = e.generate(input_ids=PROMPT, sampling_params={**GREEDY, "ignore_eos": True})
    assert out["output_ids"] == greedy_ids
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 32}

    out = e.generate(input_ids=PROMPT, sampling_params={**GREEDY, "min_new_tokens": i + 2})
    ids = out["output_ids"]
    assert ids[:i] == greedy_ids[:i] and len(ids) >= i + 2 and eos not in ids[: i + 2]
    assert_no_leak(e)
    e.shutdown()
    assert_no_leak(engine)
