"""TokenizerMetricsCollector: SGLang's ``sglang:*`` Prometheus metrics for ``GET /metrics``.

Request counters and latency histograms are updated by the TokenizerManager as outputs
arrive; scheduler gauges (running/queued requests, KV usage) are refreshed from the
scheduler's internal state when the endpoint is scraped. A private registry keeps several
servers in one process (tests) apart.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)


class TokenizerMetricsCollector:
    """Counters, histograms and gauges labelled with ``model_name``."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.labels = {"model_name": model_name}
        r = self.registry

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self.num_requests = counter("sglang:num_requests", "Number of finished requests")
        self.num_aborted_requests = counter("sglang:num_aborted_requests",
                                            "Number of aborted requests")
        self.prompt_tokens = counter("sglang:prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = counter("sglang:generation_tokens", "Tokens generated")
        self.cached_tokens = counter("sglang:cached_tokens", "Prompt tokens served from the cache")
        self.e2e_latency = histogram("sglang:e2e_request_latency_seconds",
                                     "End-to-end request latency", _LATENCY_BUCKETS)
        self.ttft = histogram("sglang:time_to_first_token_seconds",
                              "Time to first token (streaming requests)", _TTFT_BUCKETS)
        self.itl = histogram("sglang:inter_token_latency_seconds",
                             "Time between output tokens (streaming requests)", _ITL_BUCKETS)
        self.num_running_reqs = gauge("sglang:num_running_reqs", "Requests running")
        self.num_queue_reqs = gauge("sglang:num_queue_reqs", "Requests waiting")
        self.token_usage = gauge("sglang:token_usage",
                                 "Fraction of KV slots held by requests (cache excluded)")
        self.kv_used_tokens = gauge("sglang:kv_used_tokens", "KV slots in use (cache included)")
        self.kv_available_tokens = gauge("sglang:kv_available_tokens", "Free KV slots")
        self.kv_compression_ratio = gauge("sglang:kv_compression_ratio",
                                          "Tokens represented per KV slot used")
        self.cache_hit_rate = gauge("sglang:cache_hit_rate", "Prefix cache hit rate (tokens)")
        self.gen_throughput = gauge("sglang:gen_throughput", "Generation throughput (token/s)")

    def observe_first_token(self, ttft: float) -> None:
        self.ttft.labels(**self.labels).observe(ttft)

    def observe_inter_token(self, latency: float, num_tokens: int) -> None:
        for _ in range(num_tokens):
            self.itl.labels(**self.labels).observe(latency / num_tokens)

    def observe_finished(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int,
                         e2e_latency: float, aborted: bool) -> None:
        self.num_requests.labels(**self.labels).inc()
        if aborted:
            self.num_aborted_requests.labels(**self.labels).inc()
        self.prompt_tokens.labels(**self.labels).inc(prompt_tokens)
        self.generation_tokens.labels(**self.labels).inc(completion_tokens)
        self.cached_tokens.labels(**self.labels).inc(cached_tokens)
        self.e2e_latency.labels(**self.labels).observe(e2e_latency)

    def update_scheduler_state(self, state: dict[str, Any]) -> None:
        """Refresh the gauges from ``Scheduler.get_internal_state()``."""
        kv = state.get("kv_cache", {})
        total = kv.get("total_slots") or 1
        self.num_running_reqs.labels(**self.labels).set(state.get("num_running_reqs", 0))
        self.num_queue_reqs.labels(**self.labels).set(state.get("num_waiting_reqs", 0))
        self.kv_used_tokens.labels(**self.labels).set(kv.get("used_slots", 0))
        self.kv_available_tokens.labels(**self.labels).set(kv.get("free_slots", 0))
        in_use = kv.get("used_slots", 0) - kv.get("evictable_slots", 0)  # held by requests
        self.token_usage.labels(**self.labels).set(in_use / total)
        self.kv_compression_ratio.labels(**self.labels).set(kv.get("compression_ratio", 1.0))
        self.cache_hit_rate.labels(**self.labels).set(kv.get("cache_hit_rate", 0.0))
        self.gen_throughput.labels(**self.labels).set(state.get("last_gen_throughput", 0.0))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
