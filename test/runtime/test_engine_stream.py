"""The offline Engine's streaming and asyncio APIs (SGLang's ``generate(stream=True)`` and
``async_generate``): streamed updates end at the blocking result, concurrent async calls are
batched together, and a stream stopped early or a cancelled call frees its KV."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from sglang_chelsea import Engine
from utils.runtime import assert_no_leak, random_ids

PROMPTS = [random_ids(20, seed=s) for s in (1, 2, 3, 4)]
GREEDY = {"max_new_tokens": 24, "temperature": 0}


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: str) -> Iterator[Any]:
    e = Engine(model_path=tiny_llama_dir, context_length=256, max_total_tokens=2048,
               log_level="warning")
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def expected(engine: Any) -> list[dict]:
    """The blocking results of PROMPTS, one call each."""
    return [engine.generate(input_ids=p, sampling_params=GREEDY) for p in PROMPTS]


def _same_result(a: dict, b: dict) -> None:
    assert a["text"] == b["text"] and a["output_ids"] == b["output_ids"]
    assert a["meta_info"]["finish_reason"] == b["meta_info"]["finish_reason"]
    assert a["meta_info"]["completion_tokens"] == b["meta_info"]["completion_tokens"]


def test_stream_is_cumulative_and_ends_at_the_result(engine: Any, expected: list[dict]) -> None:
    chunks = list(engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY, stream=True))
    assert len(chunks) >= 2
    for prev, cur in zip(chunks, chunks[1:]):
        assert cur["text"].startswith(prev["text"])
        assert cur["output_ids"][:len(prev["output_ids"])] == prev["output_ids"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    _same_result(chunks[-1], expected[0])
    assert_no_leak(engine)


def test_batch_stream_has_index(engine: Any, expected: list[dict]) -> None:
    last: dict[int, dict] = {}
    for chunk in engine.generate(input_ids=PROMPTS[:3], sampling_params=GREEDY, stream=True):
        assert "index" in chunk
        last[chunk["index"]] = chunk
    assert sorted(last) == [0, 1, 2]
    for i in range(3):
        _same_result(last[i], expected[i])


def test_stream_hides_stop_strings(engine: Any, expected: list[dict]) -> None:
    text = expected[1]["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    params = {**GREEDY, "stop": stop}
    final = engine.generate(input_ids=PROMPTS[1], sampling_params=params)
    assert final["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    chunks = list(engine.generate(input_ids=PROMPTS[1], sampling_params=params, stream=True))
    assert all(stop not in c["text"] and final["text"].startswith(c["text"]) for c in chunks)
    _same_result(chunks[-1], final)


def test_stopping_a_stream_aborts_and_frees(engine: Any, expected: list[dict]) -> None:
    stream = engine.generate(input_ids=PROMPTS[2], sampling_params=GREEDY, stream=True,
                             rid="early-stop")
    first = next(stream)
    assert first["meta_info"]["id"] == "early-stop"
    with pytest.raises(ValueError, match="already in use"):
        engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY, rid="early-stop")
    stream.close()
    assert_no_leak(engine)
    # the rid is free again and the engine still answers as before
    _same_result(engine.generate(input_ids=PROMPTS[2], sampling_params=GREEDY,
                                 rid="early-stop"), expected[2])


def test_async_generate_batches_concurrent_calls(engine: Any, expected: list[dict]) -> None:
    async def run() -> list[Any]:
        return await asyncio.gather(*(engine.async_generate(input_ids=p, sampling_params=GREEDY)
                                      for p in PROMPTS))

    before = engine.scheduler.forward_ct
    results = asyncio.run(run())
    steps = engine.scheduler.forward_ct - before
    for got, want in zip(results, expected):
        _same_result(got, want)
    # one call alone takes a prefill and 23 decode steps; four sequential calls take 96
    assert steps < 2 * 24, steps
    assert_no_leak(engine)


def test_async_stream(engine: Any, expected: list[dict]) -> None:
    async def run() -> list[dict]:
        stream = await engine.async_generate(input_ids=PROMPTS[3], sampling_params=GREEDY,
                                             stream=True)
        return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    assert len(chunks) >= 2
    assert all(b["text"].startswith(a["text"]) for a, b in zip(chunks, chunks[1:]))
    _same_result(chunks[-1], expected[3])
    assert_no_leak(engine)


def test_async_cancel_and_bad_input(engine: Any, expected: list[dict]) -> None:
    long = {"max_new_tokens": 200, "temperature": 0, "ignore_eos": True}

    async def run() -> None:
        with pytest.raises(ValueError, match="max_new_tokens"):
            await engine.async_generate(input_ids=PROMPTS[0],
                                        sampling_params={"max_new_tokens": -1})
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(engine.async_generate(input_ids=PROMPTS[0],
                                                         sampling_params=long), 0.05)

    asyncio.run(run())
    assert_no_leak(engine)
    _same_result(engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY), expected[0])


def test_sglang_only_arguments(engine: Any, expected: list[dict]) -> None:
    """SGLang's Engine arguments for features this runtime lacks: fine when unset."""
    out = engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY, image_data=None,
                          lora_path=None, return_hidden_states=False)
    _same_result(out, expected[0])
    with pytest.raises(ValueError, match="lora_path is not supported"):
        engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY, lora_path="adapter")
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_tokens'"):
        engine.generate(input_ids=PROMPTS[0], max_tokens=3)
    with pytest.raises(ValueError, match="image_data is not supported"):
        asyncio.run(engine.async_generate("hi", image_data="cat.png"))
    assert_no_leak(engine)
