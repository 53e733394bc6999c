"""SGLang's native endpoints over HTTP: /generate (single, batch, streaming, logprobs),
info, load, metrics, health, flush_cache and abort_request."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import requests
from utils.http_client import post, stream_events

PROMPT = "The capital of France is"
GREEDY = {"max_new_tokens": 8, "temperature": 0}


def test_generate_single(url: str) -> None:
    out = post(url, {"text": PROMPT, "sampling_params": GREEDY}).json()
    assert "Paris" in out["text"]
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["completion_tokens"] == len(out["output_ids"]) == 8
    assert meta["prompt_tokens"] == 5
    assert {"id", "cached_tokens", "e2e_latency"} <= set(meta)


def test_generate_batch_text_and_ids(url: str) -> None:
    single = post(url, {"text": PROMPT, "sampling_params": GREEDY}).json()
    outs = post(url, {"text": [PROMPT, "1, 2, 3,"], "sampling_params": GREEDY}).json()
    assert isinstance(outs, list) and len(outs) == 2
    assert outs[0]["text"] == single["text"]
    ids = [[504, 3575, 282, 4649, 314], [33, 28, 216, 34]]
    outs = post(url, {"input_ids": ids, "sampling_params": [GREEDY, {"max_new_tokens": 2}],
                      "rid": ["ids-a", "ids-b"]}).json()
    assert [o["meta_info"]["id"] for o in outs] == ["ids-a", "ids-b"]
    assert [o["meta_info"]["completion_tokens"] for o in outs] == [8, 2]


def test_generate_stream_is_cumulative(url: str) -> None:
    final = post(url, {"text": PROMPT, "sampling_params": GREEDY}).json()
    events = stream_events(url, {"text": PROMPT, "sampling_params": GREEDY})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 2
    for prev, cur in itertools.pairwise(chunks):
        assert cur["text"].startswith(prev["text"])
        assert cur["meta_info"]["completion_tokens"] >= prev["meta_info"]["completion_tokens"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert chunks[-1]["text"] == final["text"]


def test_stream_never_shows_stop_string(url: str) -> None:
    body = {"text": "Count: 1, 2, 3, 4,", "sampling_params": {
        "max_new_tokens": 32, "temperature": 0, "stop": [" 7"]}}
    final = post(url, body).json()
    assert final["meta_info"]["finish_reason"] == {"type": "stop", "matched": " 7"}
    chunks = stream_events(url, body)[:-1]
    for c in chunks:
        assert " 7" not in c["text"]
        assert final["text"].startswith(c["text"])
    assert chunks[-1]["text"] == final["text"]


def test_batch_stream_has_index(url: str) -> None:
    chunks = stream_events(url, {"text": [PROMPT, "Hello"],
                                 "sampling_params": {"max_new_tokens": 3}})[:-1]
    finished = {c["index"] for c in chunks if c["meta_info"]["finish_reason"]}
    assert finished == {0, 1}


def test_parallel_sampling_n(url: str) -> None:
    """``n`` samples of one prompt: a list of n responses (streamed with ``index``), the
    later ones hitting the first one's prompt in the radix cache."""
    params = {"max_new_tokens": 6, "temperature": 1.0, "seed": 3, "n": 3}
    outs = post(url, {"text": PROMPT, "sampling_params": params}).json()
    assert isinstance(outs, list) and len(outs) == 3
    assert all(o["meta_info"]["cached_tokens"] > 0 for o in outs[1:])
    chunks = stream_events(url, {"text": PROMPT, "sampling_params": params})[:-1]
    finals = {c["index"]: c["text"] for c in chunks if c["meta_info"]["finish_reason"]}
    assert [finals[i] for i in range(3)] == [o["text"] for o in outs]


def test_logprobs(url: str) -> None:
    out = post(url, {"text": PROMPT, "sampling_params": {"max_new_tokens": 3, "temperature": 0},
                     "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2,
                     "return_text_in_logprobs": True}).json()
    meta = out["meta_info"]
    inp, outp = meta["input_token_logprobs"], meta["output_token_logprobs"]
    assert len(inp) == meta["prompt_tokens"] == 5
    assert inp[0][0] is None and all(lp < 0 for lp, _, _ in inp[1:])
    assert "".join(t for _, _, t in inp) == PROMPT
    assert [tid for _, tid, _ in outp] == out["output_ids"]
    assert len(meta["output_top_logprobs"]) == 3
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])
    # greedy: the chosen token is the most likely one
    assert all(top[0][1] == tid for top, tid in zip(meta["output_top_logprobs"],
                                                     out["output_ids"]))
    # default logprob_start_len (-1): output logprobs only, as in SGLang
    out = post(url, {"text": PROMPT, "sampling_params": {"max_new_tokens": 2},
                     "return_logprob": True}).json()
    assert out["meta_info"]["input_token_logprobs"] == []
    assert len(out["meta_info"]["output_token_logprobs"]) == 2


def test_max_new_tokens_zero(url: str) -> None:
    out = post(url, {"text": PROMPT, "sampling_params": {"max_new_tokens": 0}}).json()
    assert out["text"] == "" and out["output_ids"] == []
    assert out["meta_info"]["prompt_tokens"] == 5
    assert out["meta_info"]["completion_tokens"] == 0


def test_info_endpoints(url: str) -> None:
    for path in ("/get_model_info", "/model_info"):
        info = requests.get(url + path, timeout=10).json()
        assert info["model_path"].endswith(".gguf")
        assert info["is_generation"] is True and "tokenizer_path" in info
    for path in ("/get_server_info", "/server_info"):
        info = requests.get(url + path, timeout=10).json()
        assert info["max_total_num_tokens"] == 20000
        assert info["max_req_input_len"] > 0 and info["port"] > 0
        assert "api_key" not in info
        kv = info["kv_cache"]
        assert {"total_slots", "free_slots", "used_slots", "logical_tokens", "physical_slots",
                "compression_ratio", "cache_hit_rate"} <= set(kv)
        assert {"num_running_reqs", "num_waiting_reqs"} <= set(info)
    load = requests.get(url + "/get_load", timeout=10).json()
    assert load == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]
    assert requests.get(url + "/health", timeout=10).status_code == 200
    assert requests.get(url + "/health_generate", timeout=60).status_code == 200


def test_metrics(url: str) -> None:
    post(url, {"text": PROMPT, "sampling_params": {"max_new_tokens": 2}})
    r = requests.get(url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    assert values["sglang:num_requests_total"] >= 1
    assert values["sglang:prompt_tokens_total"] >= 5
    assert values["sglang:generation_tokens_total"] >= 2
    assert values["sglang:e2e_request_latency_seconds_count"] >= 1
    for gauge in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage",
                  "sglang:kv_used_tokens", "sglang:cache_hit_rate"):
        assert gauge in values


def _long_request(url: str, rid: str, result: dict[str, Any]) -> None:
    result["out"] = post(url, {"text": "Tell me a long story.", "rid": rid,
                               "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
                         ).json()


def _wait_running(url: str, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if requests.get(url + "/get_server_info", timeout=10).json()["num_running_reqs"] == n:
            return
        time.sleep(0.1)
    raise AssertionError(f"never saw {n} running requests")


def test_flush_cache_and_abort(url: str) -> None:
    result: dict[str, Any] = {}
    thread = threading.Thread(target=_long_request, args=(url, "long-1", result))
    thread.start()
    _wait_running(url, 1)
    r = requests.post(url + "/flush_cache", timeout=30)
    assert r.status_code == 400 and "running" in r.json()["error"]["message"]
    assert requests.post(url + "/abort_request", json={"rid": "long-1"},
                         timeout=10).status_code == 200
    thread.join(60)
    meta = result["out"]["meta_info"]
    assert meta["finish_reason"]["type"] == "abort"
    assert 0 < meta["completion_tokens"] < 2000
    _wait_running(url, 0)
    assert requests.post(url + "/flush_cache", timeout=30).status_code == 200
    kv = requests.get(url + "/get_server_info", timeout=10).json()["kv_cache"]
    assert kv["free_slots"] == kv["total_slots"]
