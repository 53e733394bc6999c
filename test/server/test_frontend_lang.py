"""SGLang's own frontend language (``import sglang``) as a client of the server."""

from __future__ import annotations

from typing import Any

import pytest

sgl = pytest.importorskip("sglang", reason="install the sglang wheel with --no-deps (make setup)")


@pytest.fixture(scope="module")
def backend(url: str) -> Any:
    from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

    backend = RuntimeEndpoint(url, chat_template_name="chatml")
    sgl.set_default_backend(backend)
    return backend


@sgl.function
def multi_turn(s: Any, question: str) -> None:
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("first", max_tokens=12, temperature=0))
    s += sgl.user("Say it again in one word.")
    s += sgl.assistant(sgl.gen("second", max_tokens=6, temperature=0))


@sgl.function
def pick_city(s: Any) -> None:
    s += "Q: What is the capital of France?\nA: The capital of France is"
    s += sgl.select("city", choices=[" London", " Paris", " Berlin"])


@sgl.function
def forked(s: Any) -> None:
    s += "Here are two facts about the Sun.\n"
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Fact {i + 1}:" + sgl.gen("fact", max_tokens=8, temperature=0, stop="\n")
    forks.join()
    s += "Facts: " + forks[0]["fact"] + " |" + forks[1]["fact"]


LONG_PREFIX = " ".join(f"Sentence {i} of a long shared context about colors." for i in range(60))


@sgl.function
def shared_prefix(s: Any, item: str) -> None:
    # A constant prefix: run_batch finds it by tracing and caches it first (max_new_tokens 0).
    s += LONG_PREFIX + "\nThe item is " + item + ". In one word, its color is"
    s += sgl.gen("color", max_tokens=3, temperature=0)


@sgl.function
def story(s: Any) -> None:
    s += "Once upon a time" + sgl.gen("story", max_tokens=10, temperature=0)


def test_gen_and_multi_turn_chat(backend: Any) -> None:
    state = multi_turn.run(question="What is the capital of France?")
    assert "Paris" in state["first"]
    assert state["second"]
    messages = state.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]


def test_select(backend: Any) -> None:
    assert pick_city.run()["city"] == " Paris"


def test_fork(backend: Any) -> None:
    state = forked.run()
    assert state.text().startswith("Here are two facts about the Sun.\nFacts: ")
    assert "\n" not in state.text().split("Facts: ", 1)[1]


def test_run_batch_with_long_shared_prefix(backend: Any) -> None:
    items = ["a banana", "the sky", "grass", "snow", "a tomato", "coal"]
    states = shared_prefix.run_batch([{"item": i} for i in items], num_threads=len(items))
    for state in states:
        assert state["color"]
        meta = state.get_meta_info("color")
        assert meta["prompt_tokens"] > 600
        # everything but the item-specific tail comes from the cached prefix
        assert meta["cached_tokens"] >= meta["prompt_tokens"] - 30


def test_streaming(backend: Any) -> None:
    state = story.run(stream=True)
    pieces = list(state.text_iter())
    assert len(pieces) > 2
    assert "".join(pieces) == state.text()
    assert state.text().startswith("Once upon a time")


def test_backend_control_calls(backend: Any) -> None:
    backend.flush_cache()  # POST /flush_cache without a body
    assert backend.get_server_info()["kv_cache"]["radix_cache_slots"] == 0
