"""SGLang's metric definitions over hand-made request outputs."""

from __future__ import annotations

import pytest
from serving.metrics import calculate_metrics, prefix_ttft_report, split_prefix_hits
from serving.request_funcs import ChunkClock, RequestOutput, generate_payload, RequestInput


def out(ttft: float, latency: float, n_out: int, prompt: int = 10, cached=None, ok=True):  # type: ignore[no-untyped-def]
    gaps = [(latency - ttft) / (n_out - 1)] * (n_out - 1) if n_out > 1 else []
    return RequestOutput(success=ok, generated_text="x" * n_out, latency=latency, ttft=ttft,
                         itl=gaps, prompt_len=prompt, output_len=n_out, cached_tokens=cached)


def test_throughputs_and_latencies() -> None:
    outs = [out(0.1, 1.1, 11), out(0.3, 2.3, 5), out(9.0, 9.0, 3, ok=False)]
    m = calculate_metrics(outs, duration_s=4.0, retokenize=len)
    assert (m.completed, m.failed, m.total_input, m.total_output) == (2, 1, 20, 16)
    assert m.total_output_retokenized == 16
    assert m.request_throughput == pytest.approx(0.5)
    assert m.input_throughput == pytest.approx(5.0)
    assert m.output_throughput == pytest.approx(4.0)
    assert m.total_throughput == pytest.approx(9.0)
    assert m.concurrency == pytest.approx((1.1 + 2.3) / 4.0)
    lat = m.latency
    assert lat["mean_ttft_ms"] == pytest.approx(200.0)
    assert lat["median_e2e_latency_ms"] == pytest.approx(1700.0)
    # TPOT: (1.1 - 0.1) / 10 = 100 ms and (2.3 - 0.3) / 4 = 500 ms
    assert lat["mean_tpot_ms"] == pytest.approx(300.0)
    # ITL: ten gaps of 100 ms and four of 500 ms, pooled
    assert lat["mean_itl_ms"] == pytest.approx((10 * 100 + 4 * 500) / 14)
    assert lat["median_itl_ms"] == pytest.approx(100.0)
    assert lat["max_itl_ms"] == pytest.approx(500.0)
    assert lat["p99_ttft_ms"] == pytest.approx(100 + 0.99 * 200)


def test_single_token_outputs_have_no_tpot() -> None:
    m = calculate_metrics([out(0.2, 0.2, 1)], duration_s=1.0)
    assert m.latency["mean_tpot_ms"] == 0.0 and m.latency["mean_ttft_ms"] == pytest.approx(200)


def test_prefix_hits_from_server_cached_tokens() -> None:
    outs = [out(2.0, 3, 2, prompt=100, cached=0), out(0.1, 1, 2, prompt=100, cached=96),
            out(0.3, 1, 2, prompt=100, cached=40), out(0.2, 1, 2, prompt=100, cached=90)]
    hits, misses, rule = split_prefix_hits(outs, [0, 0, 1, 1])
    assert (hits, misses) == ([1, 3], [0, 2]) and "cached_tokens" in rule
    report = prefix_ttft_report(outs, [0, 0, 1, 1])
    assert report is not None
    assert report["hit_median_ttft_ms"] == pytest.approx(150.0)
    assert report["miss_median_ttft_ms"] == pytest.approx(1150.0)
    assert report["median_ttft_hit_over_miss"] == pytest.approx(150 / 1150)


def test_prefix_hits_fall_back_to_first_of_group() -> None:
    outs = [out(1, 2, 2), out(1, 2, 2), out(1, 2, 2), out(1, 2, 2, ok=False), out(1, 2, 2)]
    hits, misses, rule = split_prefix_hits(outs, [1, 0, 1, 0, 0])
    assert (hits, misses) == ([2, 4], [0, 1]) and "first request" in rule
    assert prefix_ttft_report(outs, [None] * 5) is None


def test_chunk_clock_spreads_gaps_over_new_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    times = iter([1.5, 2.0, 2.0, 3.5])
    monkeypatch.setattr("serving.request_funcs.time.perf_counter", lambda: next(times))
    o = RequestOutput(start_time=1.0)
    clock = ChunkClock(o)
    clock.arrived(1)  # t=1.5: first token
    clock.arrived(3)  # t=2.0: two tokens at once -> two gaps of 0.25
    clock.arrived(3)  # t=2.0: no new token -> ignored
    clock.arrived(6)  # t=3.5: three tokens -> three gaps of 0.5
    assert o.ttft == pytest.approx(0.5)
    assert o.itl == pytest.approx([0.25, 0.25, 0.5, 0.5, 0.5])


def test_generate_payload_is_sglang_clients() -> None:
    body = generate_payload(RequestInput([5, 6], "u", 2, 9, "m", extra_body={"x": 1}))
    assert body == {"input_ids": [5, 6], "sampling_params": {
        "temperature": 0.0, "max_new_tokens": 9, "ignore_eos": True}, "stream": True,
        "lora_path": None, "return_logprob": False, "return_routed_experts": False,
        "logprob_start_len": -1, "x": 1}
    assert "text" in generate_payload(RequestInput("hi", "u", 1, 1, "m"))
