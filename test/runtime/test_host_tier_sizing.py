"""The host KV tier (recall, offload) is sized within host memory, never past it.

On the CPU the device pool and the host tier share one memory: ``--mem-fraction-static``
covers both. A host tier that cannot fit is refused at start with a clear error (before,
``--chelsea-recall-budget`` with the defaults took 5x the pool's fraction, and the kernel
killed the scheduler).
"""

from __future__ import annotations

import pytest

from sglang_chelsea.mem_cache.host_pool import host_kv_bytes_per_slot
from sglang_chelsea.mem_cache.memory_pool import kv_bytes_per_slot
from sglang_chelsea.model_executor import model_runner
from sglang_chelsea.server_args import ServerArgs

MEMORY = 64 * 2**20  # what the stand-in /proc/meminfo reports available


@pytest.fixture
def small_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_runner, "available_memory_bytes", lambda device="cpu": MEMORY)


def _slot_bytes(runner: model_runner.ModelRunner) -> tuple[int, int]:
    cfg = runner.model_config
    return (kv_bytes_per_slot(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                              runner.dtype),
            host_kv_bytes_per_slot(cfg.num_hidden_layers, cfg.num_key_value_heads,
                                   cfg.head_dim, runner.dtype))


@pytest.mark.parametrize("flags", [{"kv_compression": "chelsea", "chelsea_recall_budget": 64},
                                   {"kv_compression": "clusterkv", "kv_offload": True,
                                    "clusterkv_full_layers": 0}])
def test_cpu_pool_and_host_tier_share_the_static_fraction(
        tiny_llama_dir: str, small_host: None, flags: dict) -> None:
    args = ServerArgs(model_path=tiny_llama_dir, device="cpu", mem_fraction_static=0.5,
                      hicache_ratio=4.0, **flags)
    runner = model_runner.ModelRunner(args)
    device_slot, host_slot = _slot_bytes(runner)
    size = runner.max_total_num_tokens
    assert runner.host_pool is not None and runner.host_pool.size == int(size * 4.0)
    used = size * device_slot + runner.host_pool.size * host_slot
    assert 0.45 * MEMORY < used <= 0.5 * MEMORY
    # Without a host tier the pool alone takes the fraction, as before.
    plain = model_runner.ModelRunner(ServerArgs(model_path=tiny_llama_dir, device="cpu",
                                                mem_fraction_static=0.5))
    assert plain.host_pool is None
    assert plain.max_total_num_tokens == int(0.5 * MEMORY // device_slot)
    assert plain.max_total_num_tokens > 4 * size


def test_a_host_tier_that_cannot_fit_is_refused(tiny_llama_dir: str, small_host: None) -> None:
    args = ServerArgs(model_path=tiny_llama_dir, device="cpu", max_total_tokens=20000,
                      hicache_ratio=8.0, kv_compression="chelsea", chelsea_recall_budget=64)
    with pytest.raises(ValueError, match="host KV tier .* need .* GiB of host memory.*"
                                         "lower --hicache-ratio"):
        model_runner.ModelRunner(args)
