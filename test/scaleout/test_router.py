"""Two workers behind SGLang's router (``--dp-size 2``: sglang-router, cache_aware).

Requests over four long shared prefixes, sent concurrently through the router, land per
prefix on one worker (each prefix is cached, clustered, on exactly one worker); the outputs
equal a single worker's; ``/flush_cache`` through the router empties both workers.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from utils.server_process import ServerProcess, cli_args, launch_server_process

from sglang_chelsea.entrypoints.engine import Engine

pytest.importorskip("sglang_router", reason="sglang-router (the test extra) is not installed")

CHUNK = 16
WORKER_ARGS = {"max_total_tokens": 6000, "num_threads": 1, "kv_compression": "chelsea",
               "chelsea_chunk_size": CHUNK}
WORDS = ("river mountain quiet engine window garden silver market ancient bridge letter "
         "winter orange castle forest number signal harbor paper valley yellow machine "
         "island candle thunder meadow pocket lantern").split()
NUM_PREFIXES = 4
FOLLOWERS = 3  # concurrent requests per prefix after the first one
SAMPLING = {"max_new_tokens": 6, "temperature": 0}


def make_prefix(k: int) -> str:
    rng = random.Random(k)
    return f"Document {k}: " + " ".join(rng.choice(WORDS) for _ in range(120)) + "."


PREFIXES = [make_prefix(k) for k in range(NUM_PREFIXES)]
FIRST = [p + " Question 0: which word comes first?" for p in PREFIXES]
FOLLOW = [p + f" Question {j}: which word comes {j} times?"
          for p in PREFIXES for j in range(1, FOLLOWERS + 1)]


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory: pytest.TempPathFactory, default_model_path: str
              ) -> Iterator[tuple[ServerProcess, list[str]]]:
    log = tmp_path_factory.mktemp("dp") / "server.log"
    srv = launch_server_process(["--dp-size", "2", *cli_args(WORKER_ARGS)], log)
    found = re.search(r"Workers behind the router \(cache_aware\): (.*)", srv.log())
    assert found, srv.log()[-2000:]
    yield srv, found.group(1).split()
    srv.stop()


def generate(url: str, text: str, **sampling: Any) -> dict[str, Any]:
    r = requests.post(url + "/generate", json={"text": text,
                                               "sampling_params": {**SAMPLING, **sampling}},
                      timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def kv_cache(url: str) -> dict[str, Any]:
    return requests.get(url + "/get_server_info", timeout=60).json()["kv_cache"]


def generate_all(url: str, texts: list[str]) -> list[list[int]]:
    """Send ``texts`` concurrently; their output ids."""
    with ThreadPoolExecutor(len(texts)) as pool:
        return [r["output_ids"] for r in pool.map(lambda t: generate(url, t), texts)]


def test_cache_aware_routing_and_flush(dp_server: tuple[ServerProcess, list[str]]) -> None:
    srv, workers = dp_server
    assert len(workers) == 2
    # The first request of every prefix concurrently (the router spreads them by load: it
    # knows none of the prefixes), then the others concurrently: each is sent where its
    # prefix went. (Two waves keep which requests hit a clustered prefix deterministic, so
    # outputs can be compared with a single worker's.)
    outputs = generate_all(srv.url, FIRST) + generate_all(srv.url, FOLLOW)

    # Each worker served (and clustered) a share, and its followers hit the cache.
    stats = [kv_cache(w) for w in workers]
    for s in stats:
        assert s["clustered_chunks"] > 0 and s["cache_hit_rate"] > 0.3, stats

    # Every prefix is cached (clustered) on exactly one worker: all its requests went there.
    owners = []
    for prefix in PREFIXES:
        cached = [generate(w, prefix, max_new_tokens=0)["meta_info"]["cached_tokens"]
                  for w in workers]
        assert sorted(cached)[0] == 0 and sorted(cached)[1] >= 96, (prefix[:20], cached)
        owners.append(cached.index(max(cached)))
    assert set(owners) == {0, 1}, f"all prefixes on one worker: {owners}"

    # The same two waves on a single worker.
    engine = Engine(**WORKER_ARGS)
    expected = [r["output_ids"]
                for wave in (FIRST, FOLLOW) for r in engine.generate(wave, SAMPLING)]
    assert outputs == expected

    # /flush_cache through the router empties both workers.
    r = requests.post(srv.url + "/flush_cache", timeout=60)
    assert r.status_code == 200, r.text
    for w in workers:
        s = kv_cache(w)
        assert s["radix_cache_slots"] == 0 and s["free_slots"] == s["total_slots"], s


def test_router_forwards_openai_requests(dp_server: tuple[ServerProcess, list[str]]) -> None:
    """The router rewrites OpenAI bodies (max_tokens -> max_completion_tokens): the workers
    accept them."""
    srv, _ = dp_server
    r = requests.post(srv.url + "/v1/chat/completions", timeout=300, json={
        "model": "default", "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    r = requests.post(srv.url + "/v1/completions", timeout=300, json={
        "model": "default", "prompt": "One, two,", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
