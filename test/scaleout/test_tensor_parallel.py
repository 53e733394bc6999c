"""Tensor parallelism: sharded layers, and ``--tp-size 2`` on the CPU (gloo) giving the
same greedy tokens as one process, with and without Chelsea."""

from __future__ import annotations

from typing import Any

import pytest
import requests
import torch
from utils.server_process import cli_args, launch_server_process

from sglang_chelsea.distributed import parallel_state
from sglang_chelsea.distributed.parallel_state import TPGroup, shard_range
from sglang_chelsea.entrypoints.engine import Engine
from sglang_chelsea.layers.linear import ColumnParallelLinear, RowParallelLinear
from sglang_chelsea.model_executor import model_runner
from sglang_chelsea.server_args import ServerArgs

PROMPTS = [
    "The capital of France is",
    "List the planets of the solar system in order from the Sun: Mercury, Venus, Earth,",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who "
    "went out every morning before dawn. One day, far from the shore, his net caught",
]
SAMPLING = {"max_new_tokens": 12, "temperature": 0}
COMMON = {"max_total_tokens": 4000, "num_threads": 1}
# A high similarity floor: KV heads merge different amounts, so the slots kept per chunk
# (the most any head needs) depend on heads of both ranks.
MODES = {"none": {}, "chelsea": {"kv_compression": "chelsea", "chelsea_chunk_size": 16,
                                 "chelsea_min_similarity": 0.8}}
# Each rank measures the query prior of its own KV heads in a start-up pass of its own.
MODES["chelsea_query_weighting"] = {**MODES["chelsea"], "chelsea_query_weighting": True}
MODES["chelsea_medoid"] = {**MODES["chelsea"], "chelsea_representative": "medoid"}


def test_shard_range_covers_everything_unevenly() -> None:
    assert [shard_range(3, r, 2) for r in range(2)] == [(0, 1), (1, 3)]
    assert [shard_range(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_sharded_linears_sum_to_the_full_layer() -> None:
    """Column shards (two fused segments, with bias) concatenated, and row shards summed
    (what the all-reduce does), give the unsharded products."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 12, generator=gen)
    seg_a, seg_b = torch.randn(6, 12, generator=gen), torch.randn(4, 12, generator=gen)
    bias_a, bias_b = torch.randn(6, generator=gen), torch.randn(4, generator=gen)
    down = torch.randn(12, 10, generator=gen)
    col_out, row_out = [], torch.zeros(5, 12)
    for rank in range(2):
        a, b = shard_range(6, rank, 2), shard_range(4, rank, 2)
        col = ColumnParallelLinear(12, [a, b], bias=True)
        col.weight.data = col.shard([seg_a, seg_b])
        col.bias.data = col.shard([bias_a, bias_b])
        col_out.append(col(x))
        row = RowParallelLinear(shard_range(10, rank, 2), 12)
        row.weight.data = row.shard(down)
        h = torch.cat([x @ seg_a.T, x @ seg_b.T], dim=1)[:, :10]
        row_out += row(h[:, slice(*row.in_shard)])  # one process: the all-reduce is a no-op
    full_a, full_b = x @ seg_a.T + bias_a, x @ seg_b.T + bias_b
    ranks = [torch.split(o, [3, 2], dim=1) for o in col_out]
    torch.testing.assert_close(torch.cat([ranks[0][0], ranks[1][0]], 1), full_a)
    torch.testing.assert_close(torch.cat([ranks[0][1], ranks[1][1]], 1), full_b)
    h = torch.cat([full_a - bias_a, full_b - bias_b], dim=1)[:, :10]
    torch.testing.assert_close(row_out, h @ down.T)


def test_more_ranks_than_kv_heads_is_a_clear_error(tiny_llama_dir: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny model has 2 KV heads: rank 0 of 4 refuses before touching the group."""
    monkeypatch.setattr(model_runner, "get_tp_group", lambda: TPGroup(0, 4, None, None))
    with pytest.raises(ValueError, match="larger than the model's 2 KV heads"):
        model_runner.ModelRunner(ServerArgs(model_path=tiny_llama_dir, max_total_tokens=64))
    assert parallel_state.get_tp_group() is None


@pytest.mark.parametrize("mode", list(MODES))
def test_tp2_matches_tp1_greedy(mode: str, tmp_path: Any, default_model_path: str) -> None:
    args = {**COMMON, **MODES[mode]}
    engine = Engine(**args)
    expected = [r["output_ids"] for r in engine.generate(PROMPTS, SAMPLING)]
    expected_kv = engine.get_server_info()["kv_cache"]
    del engine
    srv = launch_server_process(["--tp-size", "2", *cli_args(args)], tmp_path / "tp2.log")
    try:
        r = requests.post(srv.url + "/generate", timeout=300,
                          json={"text": PROMPTS, "sampling_params": SAMPLING})
        assert r.status_code == 200, r.text
        assert [o["output_ids"] for o in r.json()] == expected
        kv = requests.get(srv.url + "/get_server_info", timeout=60).json()["kv_cache"]
        if mode.startswith("chelsea"):
            # The same chunks kept the same number of slots: every rank agreed on the most
            # centroids any of all the KV heads needed (the warm-up "Hi" fills no chunk).
            assert kv["clustered_chunks"] > 0
            for key in ("clustered_chunks", "centroid_slots", "used_slots"):
                assert kv[key] == expected_kv[key], (kv, expected_kv)
    finally:
        assert srv.stop() in (0, 143)
