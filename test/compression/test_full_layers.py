"""A policy's leading uncompressed layers must leave a layer to compress."""

from __future__ import annotations

from typing import Any

import pytest

from sglang_chelsea.entrypoints.engine import Engine


@pytest.mark.parametrize("policy, field", [("chelsea", "chelsea_full_layers"),
                                           ("clusterkv", "clusterkv_full_layers")])
def test_full_layers_covering_the_model_is_a_clear_start_up_error(
        tiny_llama_dir: str, policy: str, field: str) -> None:
    """The tiny model has 2 layers: 2 full layers compress nothing, which used to crash the
    scheduler at the first clustering step (ClusterKV) instead of failing at start."""
    flag = "--" + field.replace("_", "-")
    with pytest.raises(ValueError, match=f"{flag} 2 leaves none of the model's 2 layers"):
        Engine(model_path=tiny_llama_dir, kv_compression=policy, log_level="warning",
               **{field: 2})


def test_clusterkv_with_one_full_layer_of_two_serves(tiny_llama_dir: str) -> None:
    engine: Any = Engine(model_path=tiny_llama_dir, kv_compression="clusterkv",
                         clusterkv_full_layers=1, clusterkv_window=128,
                         clusterkv_tokens_per_cluster=8, clusterkv_budget=32,
                         log_level="warning")
    try:
        out = engine.generate(input_ids=list(range(5, 305)),
                              sampling_params={"max_new_tokens": 4, "temperature": 0})
        assert out["meta_info"]["completion_tokens"] == 4
        kv = engine.get_server_info()["kv_cache"]
        assert kv["clustered_windows"] > 0 and 0 < kv["selected_share"] < 1, kv
    finally:
        engine.shutdown()
