"""--kv-offload: ClusterKV's clustered windows live in the host tier; the device keeps the
sinks, the windows' handles, the unclustered tail, the cluster index and per request the
host rows its last decode step attended (copying in only the changed ones)."""

from __future__ import annotations

from typing import Any

import pytest
import sglang_chelsea.managers.scheduler as scheduler_module
import torch
from sglang_chelsea import Engine
from sglang_chelsea.mem_cache.host_pool import DeviceWorkingSet, HostKVPool, HostReader
from sglang_chelsea.server_args import ServerArgs, prepare_server_args
from utils.runtime import assert_no_leak, random_ids

GREEDY = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
SINKS, WINDOW = 4, 64


def _engine(model_path: str, offload: bool, **kw: Any) -> Engine:
    args: dict[str, Any] = {
        "model_path": model_path, "max_total_tokens": 4000, "log_level": "warning",
        "kv_compression": "clusterkv", "chelsea_chunk_size": 32, "clusterkv_window": WINDOW,
        "clusterkv_tokens_per_cluster": 8, "clusterkv_sink_tokens": SINKS,
        "clusterkv_full_layers": 0, "clusterkv_budget": 40, "kv_offload": offload}
    return Engine(**{**args, **kw})


def _logprobs(out: dict) -> list[float]:
    return [x for x, _, _ in out["meta_info"]["output_token_logprobs"]]


def _run(model_path: str, offload: bool, ids: Any, **kw: Any) -> tuple[Any, dict]:
    engine = _engine(model_path, offload, **kw)
    out = engine.generate(input_ids=ids, sampling_params=GREEDY, return_logprob=True)
    kv = engine.get_server_info()["kv_cache"]
    assert_no_leak(engine)
    engine.shutdown()
    return out, kv


@pytest.mark.parametrize("kw", [
    {"chunked_prefill_size": -1},  # whole-prompt prefill: windows move out after it
    {"chunked_prefill_size": 48},  # later chunks stream the offloaded windows back
    {"chunked_prefill_size": 48, "clusterkv_full_layers": 1, "clusterkv_budget": 100},
], ids=["decode", "chunked-prefill", "full-layer"])
def test_offload_gives_the_same_tokens_as_no_offload(tiny_llama_dir: str, kw: dict) -> None:
    ids = random_ids(300, 11)  # 4 windows after the prompt, a 5th during decode
    want, kv_ref = _run(tiny_llama_dir, False, ids, **kw)
    got, kv = _run(tiny_llama_dir, True, ids, **kw)
    assert got["output_ids"] == want["output_ids"]
    assert _logprobs(got) == pytest.approx(_logprobs(want), abs=1e-5)
    # The same windows and the same selections, read from the host tier.
    assert kv["clustered_windows"] == kv_ref["clustered_windows"] == 5
    assert kv["selected_share"] == kv_ref["selected_share"]
    assert kv["offloaded_windows"] == 5 and kv["unoffloaded_windows"] == 0
    assert kv["decode_host_to_device_bytes"] > 0 and kv["offload_decode_steps"] > 0
    if kw["chunked_prefill_size"] > 0:  # chunks after the first window streamed it
        assert kv["host_to_device_bytes"] > kv["decode_host_to_device_bytes"]


def test_device_keeps_sinks_handles_tail_and_copies_only_changes(tiny_llama_dir: str) -> None:
    engine = _engine(tiny_llama_dir, True, chunked_prefill_size=-1)
    seen: list[dict] = []
    original = scheduler_module.sample_batch

    def sample(scheduler: Any, reqs: list, logits: torch.Tensor) -> None:
        seen.append(scheduler.kv_cache_stats())
        original(scheduler, reqs, logits)

    scheduler_module.sample_batch = sample
    try:
        engine.generate(input_ids=random_ids(300, 12), sampling_params=GREEDY)
    finally:
        scheduler_module.sample_batch = original
    cfg = engine.scheduler.model_config
    rows_per_token = cfg.num_hidden_layers * cfg.num_key_value_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for kv in seen[1:]:  # decode steps (the first sample follows the prefill)
        windows = kv["offloaded_windows"]
        assert windows >= 4
        # Device pool: sinks + one handle per window + the raw tail (under a window).
        tail = kv["device_kv_slots"] - SINKS - windows
        assert 0 <= tail < WINDOW
        assert kv["host_slots"] == windows * WINDOW - SINKS
        # The working set holds what the step attended: at most the budget per query head.
        assert 0 < kv["device_working_set_rows"] <= rows_per_token * group * 40
        assert kv["device_kv_bytes"] == (kv["device_pool_bytes"] + kv["device_working_set_bytes"]
                                         + kv["cluster_index_bytes"])
    copied = [kv["host_to_device_rows_last_step"] for kv in seen[1:]]
    resident = [kv["device_working_set_rows"] for kv in seen[1:]]
    # The first decode step copies its whole selection in; later steps only what changed.
    assert copied[0] == resident[0]
    assert sum(copied[1:]) < sum(resident[1:])
    # Finished: its working set left the device; the radix tree keeps sinks + handles.
    kv = engine.get_server_info()["kv_cache"]
    assert kv["device_working_set_rows"] == 0
    assert kv["used_slots"] == SINKS + kv["offloaded_windows"] == SINKS + 5
    assert kv["host_slots"] == 5 * WINDOW - SINKS
    # Evicting the radix tree frees the host copies with the handles; flush empties both tiers.
    tree = engine.scheduler.tree_cache
    tree.evict(tree.evictable_size())
    kv = engine.get_server_info()["kv_cache"]
    assert kv["host_slots"] == 0 and kv["indexed_windows"] == 0
    assert engine.flush_cache()
    kv = engine.get_server_info()["kv_cache"]
    assert kv["host_slots"] == 0 and kv["used_slots"] == 0 and kv["device_kv_bytes"] == 0
    assert kv["cluster_index_bytes"] == 0 and kv["host_to_device_bytes"] == 0
    engine.shutdown()


def test_radix_hit_reuses_the_host_windows(tiny_llama_dir: str) -> None:
    prefix = random_ids(256, 13)
    engine = _engine(tiny_llama_dir, True)
    engine.generate(input_ids=prefix + random_ids(20, 14), sampling_params=GREEDY)
    kv = engine.get_server_info()["kv_cache"]
    assert kv["clustered_windows"] == 4 and kv["host_slots"] == 4 * WINDOW - SINKS
    second = prefix + random_ids(20, 15)
    hit = engine.generate(input_ids=second, sampling_params=GREEDY, return_logprob=True)
    assert hit["meta_info"]["cached_tokens"] == 256
    kv2 = engine.get_server_info()["kv_cache"]
    assert kv2["reused_windows"] == 4  # found by their handles, not clustered again
    assert kv2["clustered_windows"] == 4 and kv2["host_slots"] == kv["host_slots"]
    assert_no_leak(engine)
    engine.shutdown()
    # What the hit computed from the host tier is what a cold run without offload computes.
    want, _ = _run(tiny_llama_dir, False, second)
    assert hit["output_ids"] == want["output_ids"]
    assert _logprobs(hit) == pytest.approx(_logprobs(want), abs=1e-5)


def test_batch_sharing_a_prefix_and_a_full_host_tier(tiny_llama_dir: str) -> None:
    """Two requests sharing a prefix submitted together (the second waits for the first's
    prefill, then hits its offloaded windows), then a host tier too small for every window
    (the rest stay on the device): the outputs are still no-offload's."""
    prefix = random_ids(200, 16)
    ids = [prefix + random_ids(40, 17), prefix + random_ids(40, 18)]
    want, _ = _run(tiny_llama_dir, False, ids, chunked_prefill_size=-1)
    got, kv = _run(tiny_llama_dir, True, ids, chunked_prefill_size=-1)
    assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
    for g, w in zip(got, want):
        assert _logprobs(g) == pytest.approx(_logprobs(w), abs=1e-5)
    # 4 windows each (280 tokens), 3 of them shared: 5 distinct windows, each clustered once.
    assert kv["clustered_windows"] == 5 and kv["indexed_windows"] == 5
    assert kv["host_slots"] == 5 * WINDOW - SINKS
    # 160 host slots: two windows fit, the others stay on the device.
    one = random_ids(300, 19)
    want1, _ = _run(tiny_llama_dir, False, one)
    got1, kv1 = _run(tiny_llama_dir, True, one, hicache_ratio=0.04)
    assert kv1["unoffloaded_windows"] > 0 and kv1["offloaded_windows"] == 2
    assert got1["output_ids"] == want1["output_ids"]
    assert _logprobs(got1) == pytest.approx(_logprobs(want1), abs=1e-5)


def test_working_set_copies_in_only_what_changed() -> None:
    torch.manual_seed(0)
    host = HostKVPool(50, 1, 2, 8, torch.float32)
    host.k_buffer[0].normal_()
    host.v_buffer[0].normal_()
    link = HostReader(host, torch.device("cpu"))
    ws = DeviceWorkingSet(link)
    kv_head = torch.tensor([0, 0, 1, 1])  # two query heads per KV head
    a = torch.tensor([[1, 2, 3], [3, 2, 4], [1, 2, 3], [5, 6, 7]])
    k, v = ws.gather(0, kv_head, a)
    want_k, want_v = host.gather(0, kv_head, a)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    assert link.stats.rows == 4 + 6 and ws.resident_rows() == 10  # union per KV head
    link.stats.new_step()
    k, v = ws.gather(0, kv_head, a)  # the same selection again: nothing crosses
    assert link.stats.step_rows == 0 and torch.equal(k, want_k) and torch.equal(v, want_v)
    link.stats.new_step()
    b = torch.tensor([[1, 2, 9], [9, 9, 9], [5, 6, 7], [5, 6, 8]])
    k, v = ws.gather(0, kv_head, b)
    want_k, want_v = host.gather(0, kv_head, b)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    assert link.stats.step_rows == 2  # (head 0, slot 9) and (head 1, slot 8)
    assert link.stats.step_bytes == 2 * 2 * 8 * 4
    assert ws.resident_rows() == 7  # only this step's rows stay: {1,2,9} and {5,6,7,8}


def test_offload_flags_are_checked() -> None:
    for policy in ("none", "chelsea", "streaming"):
        with pytest.raises(ValueError, match="kv-offload needs --kv-compression clusterkv"):
            ServerArgs(kv_compression=policy, kv_offload=True)
    args = ServerArgs(kv_compression="clusterkv", kv_offload=True, clusterkv_window=256)
    assert args.effective_page_size == 256  # a radix page is one window
    cli = prepare_server_args(["--kv-compression", "clusterkv", "--kv-offload"])
    assert cli.kv_offload and not prepare_server_args([]).kv_offload
