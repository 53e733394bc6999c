"""bench_serving.py end to end against a started server on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import bench_serving
from utils.server_process import launch_server_process


def test_shared_prefix_run_against_a_tiny_server(tmp_path: Path, tiny_llama_dir: str) -> None:
    server = launch_server_process(["--model-path", tiny_llama_dir, "--num-threads", "1",
                                    "--max-total-tokens", "4000"], tmp_path / "server.log")
    try:
        out_file = tmp_path / "serving.jsonl"
        result = bench_serving.main([
            "--base-url", server.url, "--dataset-name", "generated-shared-prefix",
            "--gsp-num-groups", "2", "--gsp-prompts-per-group", "2",
            "--gsp-system-prompt-len", "256", "--gsp-question-len", "16",
            "--gsp-output-len", "4", "--max-concurrency", "1", "--flush-cache",
            "--output-file", str(out_file), "--output-details", "--disable-tqdm"])
    finally:
        server.stop()
    assert result["completed"] == 4 and result["failed"] == 0
    assert result["total_output_tokens"] == 16
    assert all(0 < t for t in result["ttfts"]) and all(len(g) <= 3 for g in result["itls"])
    # Sequential requests: after each group's first request its prefix is cached.
    prefix = result["prefix_ttft"]
    assert (prefix["num_hits"], prefix["num_misses"]) == (2, 2)
    assert "cached_tokens" in prefix["rule"]
    for i, group in enumerate(result["groups"]):
        first = result["groups"].index(group) == i
        assert (result["cached_tokens"][i] == 0) == first
    assert result["server_kv_cache"]["total_slots"] == 4000
    line = json.loads(out_file.read_text().splitlines()[-1])
    assert line["output_throughput"] > 0 and line["median_ttft_ms"] > 0
