"""DetokenizerManager: incremental text across multi-byte characters and stop strings."""

from __future__ import annotations

from typing import Any

import pytest
from sglang_chelsea.managers.detokenizer_manager import (
    DecodeStatus,
    DetokenizerManager,
    hide_stop_strings,
)
from sglang_chelsea.managers.io_struct import BatchTokenIDOutput, ReqOutput
from sglang_chelsea.model_loader import load_tokenizer
from sglang_chelsea.sampling.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(default_model_path: str) -> Any:
    return load_tokenizer(default_model_path)


def _stream(tokenizer: Any, ids: list[int], sp: SamplingParams,
            finished_reason: dict[str, Any]) -> tuple[list[str], str]:
    status = DecodeStatus(sp)
    texts = [status.append(tokenizer, [t]) for t in ids[:-1]]
    return texts, status.finish(tokenizer, ids[-1:], finished_reason)


def test_multibyte_characters_are_held_back(tokenizer: Any) -> None:
    text = "héllo 你好 🎉 ok"
    ids = tokenizer.encode(text)
    texts, final = _stream(tokenizer, ids, SamplingParams(), {"type": "length", "length": 1})
    assert final == text
    for t in texts:
        assert "\ufffd" not in t
        assert final.startswith(t)
    assert texts == sorted(texts, key=len)  # cumulative, never shrinking
    assert "你好 🎉" in texts[-1]


def test_stop_string_never_streamed(tokenizer: Any) -> None:
    ids = tokenizer.encode("The answer is 4.\n\nUser: next question")
    sp = SamplingParams.from_dict({"stop": ["\n\nUser:"]})
    texts, final = _stream(tokenizer, ids, sp, {"type": "stop", "matched": "\n\nUser:"})
    assert final == "The answer is 4."
    for t in texts:
        assert final.startswith(t), (t, final)
        assert "\n" not in t


def test_hide_stop_strings() -> None:
    assert hide_stop_strings("abc STO", ["STOP"]) == "abc "
    assert hide_stop_strings("abc STOP more", ["STOP"]) == "abc "
    assert hide_stop_strings("abc S", ["STOP", "xx"]) == "abc "
    assert hide_stop_strings("abc", []) == "abc"


def test_manager_tracks_requests_and_forgets_finished(tokenizer: Any) -> None:
    manager = DetokenizerManager(tokenizer)
    ids = tokenizer.encode(" Paris is nice")

    def out(new: list[int], finished: dict[str, Any] | None) -> ReqOutput:
        return ReqOutput(rid="r", new_output_ids=new, finished_reason=finished,
                         prompt_tokens=3, completion_tokens=0, cached_tokens=0)

    first = manager.handle_batch_token_id_out(
        BatchTokenIDOutput([out(ids[:1], None)], [SamplingParams()]))
    assert first.texts == [" Paris"]
    last = manager.handle_batch_token_id_out(
        BatchTokenIDOutput([out(ids[1:], {"type": "length", "length": 3})], [None]))
    assert last.texts == [" Paris is nice"]
    assert manager.decode_status == {}
