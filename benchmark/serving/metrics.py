"""SGLang's serving metrics from the per-request outputs.

Definitions (as in ``sglang.bench_serving``): throughputs divide totals over successful
requests by the benchmark duration; TPOT = (latency - TTFT) / (output tokens - 1) for
requests with more than one output token; ITL = every inter-token gap of every request;
concurrency = sum of end-to-end latencies / duration. Times are reported in ms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from serving.request_funcs import RequestOutput

STATS = ("mean", "median", "std", "p90", "p95", "p99")
JSON_NAMES = {"total_input": "total_input_tokens", "total_output": "total_output_tokens",
              "total_output_retokenized": "total_output_tokens_retokenized"}


def summarize_ms(name: str, seconds: Sequence[float]) -> dict[str, float]:
    """``{mean_<name>_ms, median_..., std_..., p90_..., p95_..., p99_...}`` (0 when empty)."""
    x = np.asarray(seconds if len(seconds) else [0.0], dtype=np.float64) * 1000
    values = (x.mean(), np.median(x), x.std(), *np.percentile(x, [90, 95, 99]))
    return {f"{stat}_{name}_ms": float(v) for stat, v in zip(STATS, values)}


@dataclass
class BenchmarkMetrics:
    completed: int
    failed: int
    total_input: int
    total_output: int
    total_output_retokenized: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    total_throughput: float
    concurrency: float
    latency: dict[str, float]  # ttft, tpot, itl, e2e_latency stats, SGLang's key names

    def to_dict(self) -> dict[str, Any]:
        """Flat, with SGLang's result-file key names."""
        d = asdict(self)
        d.update(d.pop("latency"))
        for ours, theirs in JSON_NAMES.items():
            d[theirs] = d.pop(ours)
        return d


def calculate_metrics(outputs: Sequence[RequestOutput], duration_s: float,
                      retokenize: Optional[Any] = None) -> BenchmarkMetrics:
    """Metrics over ``outputs``; ``retokenize(text) -> int`` counts output tokens again
    with the client's tokenizer (SGLang's ``retokenized`` figures)."""
    ok = [o for o in outputs if o.success]
    total_in = sum(o.prompt_len for o in ok)
    total_out = sum(o.output_len for o in ok)
    retok = sum(retokenize(o.generated_text) for o in ok) if retokenize else total_out
    ttfts = [o.ttft for o in ok]
    tpots = [(o.latency - o.ttft) / (o.output_len - 1) for o in ok if o.output_len > 1]
    itls = [gap for o in ok for gap in o.itl]
    e2e = [o.latency for o in ok]
    latency: dict[str, float] = {}
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls),
                         ("e2e_latency", e2e)):
        latency.update(summarize_ms(name, values))
    latency["max_itl_ms"] = float(max(itls, default=0.0) * 1000)
    dur = max(duration_s, 1e-9)
    return BenchmarkMetrics(
        completed=len(ok), failed=len(outputs) - len(ok), total_input=total_in,
        total_output=total_out, total_output_retokenized=retok,
        request_throughput=len(ok) / dur, input_throughput=total_in / dur,
        output_throughput=total_out / dur, total_throughput=(total_in + total_out) / dur,
        concurrency=sum(e2e) / dur, latency=latency)


def split_prefix_hits(outputs: Sequence[RequestOutput], groups: Sequence[Optional[int]],
                      min_cached_fraction: float = 0.5) -> tuple[list[int], list[int], str]:
    """Indices of prefix hits and misses among successful grouped requests, and the rule.

    When the server reports ``cached_tokens`` for all of them, a hit is a request with at
    least ``min_cached_fraction`` of its prompt served from the cache. Otherwise the first
    request sent of each group is the miss and the others are hits.
    """
    idx = [i for i, o in enumerate(outputs) if o.success and groups[i] is not None]
    if idx and all(outputs[i].cached_tokens is not None for i in idx):
        hits = [i for i in idx if outputs[i].cached_tokens  # type: ignore[operator]
                >= min_cached_fraction * max(1, outputs[i].prompt_len)]
        rule = f"server cached_tokens >= {min_cached_fraction:g} x prompt"
    else:
        seen: set[Optional[int]] = set()
        hits = []
        for i in idx:
            if groups[i] in seen:
                hits.append(i)
            seen.add(groups[i])
        rule = "first request of each group = miss"
    hit_set = set(hits)
    return hits, [i for i in idx if i not in hit_set], rule


def prefix_ttft_report(outputs: Sequence[RequestOutput], groups: Sequence[Optional[int]]
                       ) -> Optional[dict[str, Any]]:
    """TTFT of prefix hits vs misses (None when no request belongs to a group)."""
    hits, misses, rule = split_prefix_hits(outputs, groups)
    if not hits and not misses:
        return None
    report: dict[str, Any] = {"rule": rule, "num_hits": len(hits), "num_misses": len(misses)}
    report.update({f"hit_{k}": v for k, v in
                   summarize_ms("ttft", [outputs[i].ttft for i in hits]).items()})
    report.update({f"miss_{k}": v for k, v in
                   summarize_ms("ttft", [outputs[i].ttft for i in misses]).items()})
    if hits and misses:
        report["median_ttft_hit_over_miss"] = (report["hit_median_ttft_ms"]
                                               / max(report["miss_median_ttft_ms"], 1e-9))
    return report
