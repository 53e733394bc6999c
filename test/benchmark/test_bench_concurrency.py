"""bench_concurrency: a fixed pool really holds more compressed requests at once (a tiny
random-weight model served without a tokenizer, requests given as input ids)."""

from __future__ import annotations

import json
from pathlib import Path

import bench_concurrency


def test_chelsea_holds_more_requests_in_the_same_pool(tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    bench_concurrency.main(["--policies", "none", "chelsea:keep=0.2", "--input-len", "1000",
                            "--output-len", "4", "--num-requests", "6", "--pool-requests", "1",
                            "--chunked-prefill-size", "128", "--num-threads", "1",
                            "--output", str(out)])
    full, chelsea = [json.loads(line) for line in out.read_text().splitlines()]
    assert full["pool_slots"] == chelsea["pool_slots"] == 1004 + 128
    assert full["peak_running"] == 1 and full["retractions"] == 0
    # 1000 tokens at keep 0.2, chunk 128: 6 clustered chunks keep round(0.2 * 768) = 154
    # slots, plus the raw recent chunk (128) and the partial one (104) = 386 after prefill.
    assert chelsea["peak_running"] == 2 and chelsea["retractions"] == 0
    assert 386 <= chelsea["slots_per_running_req"] < 500
    assert chelsea["vs_first"] == 2.0
