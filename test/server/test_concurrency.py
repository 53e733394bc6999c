"""Many concurrent streams; clients that disconnect mid-stream get their requests aborted."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

NUM_STREAMS = 32
NUM_DISCONNECTS = 4


def full_stream(url: str, i: int) -> dict[str, Any]:
    """Read a whole stream; return its last chunk (checking the text is cumulative)."""
    body = {"text": f"Request {i}: the numbers from {i} are", "stream": True,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}}
    last: dict[str, Any] = {}
    done = False
    with requests.post(url + "/generate", json=body, stream=True, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines(decode_unicode=True):
            if not line:
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[len("data: "):])
            assert chunk["text"].startswith(last.get("text", ""))
            last = chunk
    assert done
    return last


def disconnecting_stream(url: str, i: int) -> str:
    """Read two chunks of a long stream, then hang up; return the request id."""
    body = {"text": f"Client {i} tells a long story:", "stream": True, "rid": f"gone-{i}",
            "sampling_params": {"max_new_tokens": 1000, "ignore_eos": True}}
    r = requests.post(url + "/generate", json=body, stream=True, timeout=300)
    seen = 0
    for line in r.iter_lines():
        if line:
            seen += 1
        if seen == 2:
            break
    r.close()
    return body["rid"]


def test_concurrent_streams_and_disconnects(url: str) -> None:
    with ThreadPoolExecutor(NUM_STREAMS + NUM_DISCONNECTS) as pool:
        gone = [pool.submit(disconnecting_stream, url, i) for i in range(NUM_DISCONNECTS)]
        streams = [pool.submit(full_stream, url, i) for i in range(NUM_STREAMS)]
        finals = [f.result() for f in streams]
        [f.result() for f in gone]
    for final in finals:
        assert final["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
        assert final["meta_info"]["completion_tokens"] == 8
    # the disconnected requests were aborted: nothing runs or waits any more
    deadline = time.monotonic() + 60
    while True:
        info = requests.get(url + "/get_server_info", timeout=10).json()
        if info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0:
            break
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    metrics = requests.get(url + "/metrics", timeout=10).text
    aborted = [ln for ln in metrics.splitlines() if ln.startswith("sglang:num_aborted_requests_total")]
    assert aborted and float(aborted[0].rsplit(" ", 1)[1]) >= NUM_DISCONNECTS
    assert requests.post(url + "/flush_cache", timeout=30).status_code == 200
    kv = requests.get(url + "/get_server_info", timeout=10).json()["kv_cache"]
    assert kv["free_slots"] == kv["total_slots"]


def test_retry_with_the_rid_of_a_disconnected_stream_gets_its_own_answer(url: str) -> None:
    """The disconnected request's abort output used to reach the retry (same rid): the rid
    stays in use until that request has been aborted, then the retry runs as itself."""
    rid = disconnecting_stream(url, 99)
    body = {"text": "Count: 1, 2,", "rid": rid,
            "sampling_params": {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}}
    deadline = time.monotonic() + 60
    while True:
        r = requests.post(url + "/generate", json=body, timeout=60)
        if r.status_code != 400:
            break
        assert "already in use" in r.json()["error"]["message"]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert r.status_code == 200, r.text
    reference = requests.post(url + "/generate", json={**body, "rid": None}, timeout=60).json()
    assert r.json()["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    assert r.json()["output_ids"] == reference["output_ids"]
    assert r.json()["meta_info"]["prompt_tokens"] == reference["meta_info"]["prompt_tokens"]
