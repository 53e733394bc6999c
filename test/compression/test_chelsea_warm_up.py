"""Chelsea's start-up warm-up: one matching step on stand-in data of a prefill step's size,
run on the CPU when freed memory stays in the heap, and never touching the KV pool."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sglang_chelsea import Engine
from sglang_chelsea.compression.chelsea import ChelseaCompressor
from sglang_chelsea.mem_cache.memory_pool import MHATokenToKVPool
from sglang_chelsea.server_args import ServerArgs


def test_warm_up_runs_the_matcher_and_leaves_the_pool_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    args = ServerArgs(device="cpu", kv_compression="chelsea", chelsea_chunk_size=16,
                      chelsea_keep_ratio=0.25)
    compressor = ChelseaCompressor(args)
    pool = MHATokenToKVPool(64, 3, 2, 8, torch.float32)
    for buf in pool.k_buffer + pool.v_buffer:
        buf.normal_()
    before = [b.clone() for b in pool.k_buffer + pool.v_buffer + pool.weight_buffer]
    calls: list[dict[str, Any]] = []
    import sglang_chelsea.compression.chelsea as chelsea_module
    matcher = chelsea_module.chunked_soft_matching

    def recording(keys: torch.Tensor, values: torch.Tensor, **kw: Any) -> Any:
        result = matcher(keys, values, **kw)
        calls.append({"shape": tuple(keys.shape), "kept": result.num_kept})
        return result

    monkeypatch.setattr(chelsea_module, "chunked_soft_matching", recording)
    compressor.warm_up(pool, max_chunks=5)
    # One problem per (layer, KV head, chunk), each merged down to the chunk's target.
    assert [c["shape"] for c in calls] == [(3 * 2 * 5, 1, 16, 8)]
    assert bool((calls[0]["kept"] == compressor.chunk_target(0)).all())
    after = pool.k_buffer + pool.v_buffer + pool.weight_buffer
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("malloc_tuning_off", [False, True])
def test_engine_warms_up_one_prefill_step(tiny_llama_dir: str, malloc_tuning_off: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    monkeypatch.setattr(ChelseaCompressor, "warm_up",
                        lambda self, pool, max_chunks: seen.append(max_chunks))
    engine = Engine(model_path=tiny_llama_dir, log_level="warning", kv_compression="chelsea",
                    chelsea_chunk_size=32, chunked_prefill_size=100,
                    disable_cpu_malloc_tuning=malloc_tuning_off)
    try:
        out = engine.generate("Hello there", {"max_new_tokens": 2, "temperature": 0})
        assert out["meta_info"]["completion_tokens"] == 2
    finally:
        engine.shutdown()
    # A 100-token prefill step completes at most 3 chunks of 32.
    assert seen == ([] if malloc_tuning_off else [3])
