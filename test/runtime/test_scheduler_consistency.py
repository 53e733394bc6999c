"""Scheduling must not change what a request generates.

Every configuration below (batching, chunked prefill, radix hits, page sizes, a KV pool
that forces retraction) must give each request the greedy tokens, and nearly the same
output logprobs, that it gets alone on a plain engine (no radix cache, no chunking).
After each test every KV slot and request row is free again (``assert_no_leak``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Optional

import pytest

from sglang_chelsea import Engine
from utils.runtime import assert_no_leak, random_ids

NEW = 32
LP_TOL = 1e-4
GREEDY = {"max_new_tokens": NEW, "temperature": 0}
# Mixed lengths, distinct first tokens (no shared prefixes between them).
PROMPTS = [random_ids(n, seed=100 + n) for n in (3, 17, 50, 95, 150, 200)]

Result = tuple[list[int], list[float]]


class Reference:
    """Each prompt alone on a plain engine: greedy ids and output logprobs, memoised."""

    def __init__(self, model_path: str) -> None:
        self.engine = Engine(model_path=model_path, max_total_tokens=4096,
                             disable_radix_cache=True, chunked_prefill_size=-1,
                             log_level="warning")
        self.memo: dict[tuple[tuple[int, ...], int], Result] = {}

    def __call__(self, ids: list[int], max_new_tokens: int = NEW) -> Result:
        key = (tuple(ids), max_new_tokens)
        if key not in self.memo:
            out = self.engine.generate(input_ids=ids, return_logprob=True,
                                       logprob_start_len=len(ids) - 1,
                                       sampling_params={"max_new_tokens": max_new_tokens,
                                                        "temperature": 0})
            self.memo[key] = (out["output_ids"],
                              [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]])
        return self.memo[key]

    def input_logprobs(self, ids: list[int], start: int) -> list[Optional[float]]:
        out = self.engine.generate(input_ids=ids, return_logprob=True, logprob_start_len=start,
                                   sampling_params={"max_new_tokens": 0})
        return [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"]]


@pytest.fixture(scope="module")
def ref(tiny_llama_dir: str) -> Iterator[Reference]:
    reference = Reference(tiny_llama_dir)
    yield reference
    assert_no_leak(reference.engine)
    reference.engine.shutdown()


def make_engine(path: str, **kwargs: Any) -> Any:
    kwargs.setdefault("max_total_tokens", 4096)
    return Engine(model_path=path, log_level="warning", **kwargs)


def generate(engine: Any, prompts: list[list[int]], max_new: Optional[list[int]] = None,
             return_logprob: bool = True) -> list[dict]:
    max_new = max_new or [NEW] * len(prompts)
    return engine.generate(input_ids=prompts, return_logprob=return_logprob,
                           logprob_start_len=[len(p) - 1 for p in prompts],
                           sampling_params=[{"max_new_tokens": m, "temperature": 0}
                                            for m in max_new])


def assert_matches(out: dict, expected: Result, what: str) -> None:
    ids, lps = expected
    assert out["output_ids"] == ids, what
    meta = out["meta_info"]
    assert meta["completion_tokens"] == len(ids), what
    if "output_token_logprobs" in meta:
        got = meta["output_token_logprobs"]
        assert [t for _, t, _ in got] == ids, what
        for step, ((lp, _, _), ref_lp) in enumerate(zip(got, lps)):
            assert abs(lp - ref_lp) <= LP_TOL, (what, step, lp, ref_lp)


# ---------------------------------------------------------------------- batching
@pytest.mark.parametrize("radix,page_size,max_running", [(False, 1, 64), (True, 4, 64),
                                                         (True, 1, 2)])
def test_mixed_batch_equals_each_alone(ref: Reference, tiny_llama_dir: str, radix: bool,
                                       page_size: int, max_running: int) -> None:
    engine = make_engine(tiny_llama_dir, disable_radix_cache=not radix, page_size=page_size,
                         max_running_requests=max_running)
    max_new = [32, 5, 20, 32, 1, 12]  # requests leave the batch at different steps
    outs = engine.generate(input_ids=PROMPTS, return_logprob=[True, False] * 3,
                           logprob_start_len=[len(p) - 1 for p in PROMPTS],
                           sampling_params=[{"max_new_tokens": m, "temperature": 0}
                                            for m in max_new])
    for i, (out, m) in enumerate(zip(outs, max_new)):
        ids, lps = ref(PROMPTS[i])
        assert_matches(out, (ids[:m], lps[:m]), f"request {i}")
        assert out["meta_info"]["prompt_tokens"] == len(PROMPTS[i])
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": m}
    assert_no_leak(engine)


@pytest.mark.parametrize("chunk", [16, 7])
@pytest.mark.parametrize("radix", [False, True])
def test_chunked_prefill_equals_unchunked(ref: Reference, tiny_llama_dir: str, chunk: int,
                                          radix: bool) -> None:
    engine = make_engine(tiny_llama_dir, chunked_prefill_size=chunk,
                         disable_radix_cache=not radix)
    outs = generate(engine, PROMPTS)
    for i, out in enumerate(outs):
        assert_matches(out, ref(PROMPTS[i]), f"chunk={chunk} request {i}")
    assert_no_leak(engine)


# ---------------------------------------------------------------------- radix cache
@pytest.mark.parametrize("page_size", [1, 4])
def test_radix_hit_equals_miss(ref: Reference, tiny_llama_dir: str, page_size: int) -> None:
    engine = make_engine(tiny_llama_dir, page_size=page_size)

    def aligned(n: int) -> int:
        return n // page_size * page_size

    base = PROMPTS[4]  # 150 tokens
    miss = generate(engine, [base])[0]
    assert miss["meta_info"]["cached_tokens"] == 0
    assert_matches(miss, ref(base), "miss")

    # The same prompt again: all of it but the last token (whose logits are needed) hits.
    hit = generate(engine, [base])[0]
    assert hit["meta_info"]["cached_tokens"] == aligned(len(base) - 1)
    assert_matches(hit, ref(base), "full hit")

    # A shared prefix with a new suffix.
    shared = base[:101] + random_ids(30, seed=5)
    out = generate(engine, [shared])[0]
    assert out["meta_info"]["cached_tokens"] == aligned(101)
    assert_matches(out, ref(shared), "prefix hit")

    # The prompt extended by its own output (a second turn): decode-written KV is reused.
    base_out = ref(base)[0]
    turn2 = base + base_out[:10]
    out = generate(engine, [turn2])[0]
    assert out["meta_info"]["cached_tokens"] == aligned(len(turn2) - 1)
    assert_matches(out, ref(turn2), "second turn")
    assert out["output_ids"][:NEW - 10] == base_out[10:]

    # The hits show in the reported hit rate.
    assert engine.get_server_info()["kv_cache"]["cache_hit_rate"] > 0
    assert_no_leak(engine)


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("chunk", [-1, 16])
def test_shared_prefixes_within_one_batch(ref: Reference, tiny_llama_dir: str, page_size: int,
                                          chunk: int) -> None:
    """Prefix-sharing prompts submitted together: a request sharing the prompt of one being
    prefilled waits for it, then hits its whole prompt (cached after its last chunk too, while
    it decodes), so no page is prefilled twice; outputs are unchanged."""
    engine = make_engine(tiny_llama_dir, page_size=page_size, chunked_prefill_size=chunk)
    base = PROMPTS[5]
    prompts = [base, list(base), base[:120] + random_ids(9, seed=9), base[:61],
               PROMPTS[2], base + [7, 8, 9]]
    outs = generate(engine, prompts)
    for i, out in enumerate(outs):
        assert_matches(out, ref(prompts[i]), f"page_size={page_size} chunk={chunk} request {i}")
    def aligned(n: int) -> int:
        return n // page_size * page_size
    # Hits are bounded by max_prefix_len (the prompt less its last token) and by base's prompt.
    expected = [0, aligned(len(base) - 1), aligned(120), aligned(60), 0, aligned(len(base))]
    assert [o["meta_info"]["cached_tokens"] for o in outs] == expected
    assert_no_leak(engine)


@pytest.mark.parametrize("page_size", [1, 4])
def test_lru_eviction_keeps_outputs(ref: Reference, tiny_llama_dir: str, page_size: int) -> None:
    """A pool of two requests' worth: cached prefixes are evicted (oldest first) to admit new
    requests, and what stays cached still serves correct hits."""
    prompts = [random_ids(95, seed=500 + i) for i in range(6)]
    engine = make_engine(tiny_llama_dir, max_total_tokens=260, page_size=page_size)
    for i, prompt in enumerate(prompts):
        out = generate(engine, [prompt])[0]
        assert out["meta_info"]["cached_tokens"] == 0
        assert_matches(out, ref(prompt), f"request {i}")
    kv = engine.get_server_info()["kv_cache"]
    assert kv["radix_cache_slots"] > 0 and kv["free_slots"] + kv["radix_cache_slots"] == 260
    newest = generate(engine, [prompts[-1]])[0]  # still cached
    assert newest["meta_info"]["cached_tokens"] == 94 // page_size * page_size
    assert_matches(newest, ref(prompts[-1]), "newest again")
    oldest = generate(engine, [prompts[0]])[0]  # evicted long ago
    assert oldest["meta_info"]["cached_tokens"] == 0
    assert_matches(oldest, ref(prompts[0]), "oldest again")
    assert_no_leak(engine)


# ---------------------------------------------------------------------- retraction
@pytest.mark.parametrize("radix,page_size,chunk", [(True, 1, -1), (False, 1, -1), (True, 4, -1),
                                                   (True, 1, 16), (False, 4, 7)])
def test_small_kv_pool_retracts_and_completes(ref: Reference, tiny_llama_dir: str,
                                              caplog: pytest.LogCaptureFixture, radix: bool,
                                              page_size: int, chunk: int) -> None:
    """A pool that fits one request at a time: requests are retracted (some mid chunked
    prefill, with input logprobs half collected) and all still finish unchanged."""
    prompts = [random_ids(n, seed=300 + n) for n in (40, 52, 45, 60, 38, 57)]
    need = max(len(p) for p in prompts) + NEW  # one request's KV at its end
    engine = make_engine(tiny_llama_dir, max_total_tokens=need + 8, page_size=page_size,
                         disable_radix_cache=not radix, chunked_prefill_size=chunk)
    starts = [0, len(prompts[1]) - 1, 5, len(prompts[3]) - 1, 0, 30]
    with caplog.at_level(logging.INFO, logger="sglang_chelsea.managers.scheduler"):
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True,
                               logprob_start_len=starts)
    retractions = [r for r in caplog.records if r.getMessage().startswith("Retracted request")]
    assert retractions, "the pool fits one request: the scheduler must have retracted"
    for i, out in enumerate(outs):
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": NEW}, i
        assert_matches(out, ref(prompts[i]), f"request {i}")
        expected = ref.input_logprobs(prompts[i], starts[i])
        got = out["meta_info"]["input_token_logprobs"]
        assert [t for _, t, _ in got] == prompts[i][starts[i]:], i
        assert got[0][0] is None
        for (lp, _, _), ref_lp in zip(got[1:], expected[1:]):
            assert abs(lp - ref_lp) <= LP_TOL, i
    assert_no_leak(engine)


def test_compressed_request_larger_than_the_pool_is_aborted(tiny_llama_dir: str) -> None:
    """A lone request whose KV outgrows the whole pool under a KV policy (whose slot need is
    not known in advance) ends with an abort, not a hang. (With no policy it ends with
    "length" at the pool's size: test_requests.py.)"""
    engine = make_engine(tiny_llama_dir, max_total_tokens=48, kv_compression="chelsea",
                         chelsea_keep_ratio=1.0, chelsea_chunk_size=16)
    out = engine.generate(input_ids=random_ids(40, seed=1), sampling_params=GREEDY)
    meta = out["meta_info"]
    assert meta["finish_reason"]["type"] == "abort", meta["finish_reason"]
    assert 0 < meta["completion_tokens"] < NEW
    assert_no_leak(engine)
    # The engine still serves a request that fits.
    out = engine.generate(input_ids=random_ids(10, seed=2), sampling_params=GREEDY)
    assert out["meta_info"]["completion_tokens"] == NEW
    assert_no_leak(engine)
    engine.shutdown()
