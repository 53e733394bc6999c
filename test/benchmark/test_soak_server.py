"""soak_server.py against a started Chelsea server on a tiny model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import soak_server
from utils.server_process import launch_server_process


def test_soak_of_a_tiny_chelsea_server_finds_no_failure(tmp_path: Path,
                                                        tiny_llama_dir: str) -> None:
    server = launch_server_process(
        ["--model-path", tiny_llama_dir, "--num-threads", "1", "--max-total-tokens", "3000",
         "--chunked-prefill-size", "64", "--kv-compression", "chelsea",
         "--chelsea-chunk-size", "16", "--chelsea-keep-ratio", "0.25"], tmp_path / "server.log")
    try:
        result = soak_server.main(["--base-url", server.url, "--num-requests", "60",
                                   "--concurrency", "12", "--seed", "1"])
        # The checker itself: a bad body where 200 is expected is a failure.
        soak = soak_server.Soak(server.url, seed=0, timeout_s=30)

        async def expect_ok_of_bad() -> None:
            async with aiohttp.ClientSession() as session:
                await soak.post(session, "/generate", soak.bad_body(), expect=200)

        asyncio.run(expect_ok_of_bad())
    finally:
        server.stop()
    assert result["failures"] == [], result
    counts = result["counts"]
    assert counts["/generate 200"] > 20 and counts.get("/generate 400", 0) > 0
    assert counts["/v1/chat/completions 200"] > 0 and counts["/abort_request 200"] > 0
    assert result["idle_kv_cache"]["clustered_chunks"] > 0
    assert result["flushed_kv_cache"]["free_slots"] == result["flushed_kv_cache"]["total_slots"]
    assert len(soak.failures) == 1 and "answered 400, expected 200" in soak.failures[0]
