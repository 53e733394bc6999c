"""ClusterKV: k-means and budgeted selection kernels, the selected-slot attention path,
and the policy inside the engine (exactness at full budget, window reuse on radix hits,
index lifetime, passkey on SmolLM2 at a 20% budget)."""

from __future__ import annotations

import math

import pytest
import torch

from sglang_chelsea import Engine
from utils.runtime import random_ids
from sglang_chelsea.attention.torch_backend import TorchNativeAttnBackend, masked_attention
from sglang_chelsea.compression.base import Selection
from sglang_chelsea.kernels.cluster_select import select_cluster_tokens
from sglang_chelsea.kernels.kmeans import cosine_kmeans
from sglang_chelsea.mem_cache.memory_pool import MHATokenToKVPool
from sglang_chelsea.utils.long_context_tasks import passkey_prompt

GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}


def test_kmeans_recovers_planted_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(2, 4, 16, generator=g), dim=-1) * 5
    truth = torch.randint(0, 4, (2, 64), generator=g)
    truth[:, :4] = torch.arange(4)  # every cluster present
    keys = centres.gather(1, truth[..., None].expand(-1, -1, 16))
    keys = keys + 0.05 * torch.randn(keys.shape, generator=g)
    res = cosine_kmeans(keys, k=4, iters=10)
    for b in range(2):
        # Same partition up to a relabelling: tokens share a label iff they share a centre.
        same_truth = truth[b][:, None] == truth[b][None, :]
        same_found = res.labels[b][:, None] == res.labels[b][None, :]
        assert torch.equal(same_truth, same_found)
    assert res.sizes.sum(dim=1).tolist() == [64, 64]
    # A centroid is the mean of its members' raw keys.
    members = res.labels[0] == res.labels[0, 0]
    assert torch.allclose(res.centroids[0, res.labels[0, 0]], keys[0, members].mean(0), atol=1e-5)


def test_selection_takes_best_clusters_within_budget() -> None:
    # One KV head, two query heads; three clusters with known scores per query head.
    centroids = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    labels = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1]])  # sizes 3, 3, 2
    q = torch.tensor([[0.0, 2.0], [-3.0, 0.1]])  # head 0 prefers 1, 0, 2; head 1: 2, 1, 0
    pos = select_cluster_tokens(q, centroids, labels, budget=5)
    assert pos.shape == (2, 5)
    assert set(pos[0].tolist()) == {1, 4, 7, 0, 3}  # all of cluster 1, then 0 cut to fit
    assert set(pos[1].tolist()) == {2, 5, 1, 4, 7}  # all of cluster 2, then all of 1
    assert pos[0, :3].tolist() == [1, 4, 7]  # rank order, positions ascending in a cluster
    assert select_cluster_tokens(q, centroids, labels, budget=100).shape == (2, 8)


def test_selected_path_with_every_slot_equals_full_attention() -> None:
    torch.manual_seed(0)
    pool = MHATokenToKVPool(40, 1, 2, 8, torch.float32)
    pool.k_buffer[0].normal_()
    pool.v_buffer[0].normal_()
    q = torch.randn(4, 8)
    slots = torch.arange(1, 31)
    # Each query head lists the same 30 slots in its own order.
    per_head = torch.stack([slots[torch.randperm(30)] for _ in range(4)])
    backend = TorchNativeAttnBackend()
    got = backend._attend_selection(pool, 0, q[None], Selection(per_head), 0.3)[0][0]
    keys = pool.k_buffer[0][:, slots].repeat_interleave(2, 0)
    values = pool.v_buffer[0][:, slots].repeat_interleave(2, 0)
    want = masked_attention(q[:, None], keys, values, None, 0.3)[:, 0]
    assert torch.allclose(got, want, atol=1e-6)
    # Slots shared by every head (read once per KV head) with a per-query-head bias.
    bias = torch.randn(4, 30)
    bias[torch.rand(4, 30) < 0.3] = float("-inf")
    got = backend._attend_selection(pool, 0, q[None], Selection(slots, log_weight=bias), 0.3)[0]
    want = masked_attention(q[:, None], keys, values, bias[:, None], 0.3)[:, 0]
    assert torch.allclose(got[0], want, atol=1e-6)



def _clusterkv(model_path: str, **kw) -> Engine:
    args = dict(model_path=model_path, max_total_tokens=4000, log_level="warning",
                kv_compression="clusterkv", chelsea_chunk_size=32, clusterkv_window=64,
                clusterkv_tokens_per_cluster=8, clusterkv_sink_tokens=4,
                clusterkv_full_layers=0, clusterkv_budget=40)
    args.update(kw)
    return Engine(**args)


def test_budget_covering_the_context_equals_the_full_cache(tiny_llama_dir: str) -> None:
    ids = random_ids(300, 1)
    full = Engine(model_path=tiny_llama_dir, max_total_tokens=4000, log_level="warning")
    want = full.generate(input_ids=ids, sampling_params=GREEDY, return_logprob=True)
    full.shutdown()
    engine = _clusterkv(tiny_llama_dir, clusterkv_budget=4000)
    got = engine.generate(input_ids=ids, sampling_params=GREEDY, return_logprob=True)
    assert engine.get_server_info()["kv_cache"]["clustered_windows"] == 300 // 64
    engine.shutdown()
    assert got["output_ids"] == want["output_ids"]
    lp = [x for x, _, _ in got["meta_info"]["output_token_logprobs"]]
    ref = [x for x, _, _ in want["meta_info"]["output_token_logprobs"]]
    assert lp == pytest.approx(ref, abs=1e-5)


def test_small_budget_selects_and_shared_prefix_is_clustered_once(tiny_llama_dir: str) -> None:
    engine = _clusterkv(tiny_llama_dir)
    prefix = random_ids(256, 2)
    engine.generate(input_ids=prefix + random_ids(20, 3), sampling_params=GREEDY)
    kv = engine.get_server_info()["kv_cache"]
    assert kv["clustered_windows"] == 276 // 64  # 4 windows (decode adds none: 285 < 320)
    # Decode attended the budget, a fraction of the clustered tokens.
    assert 0 < kv["selected_share"] < 1
    hit = engine.generate(input_ids=prefix + random_ids(20, 4), sampling_params=GREEDY)
    assert hit["meta_info"]["cached_tokens"] == 256
    kv2 = engine.get_server_info()["kv_cache"]
    assert kv2["reused_windows"] == 4  # the shared prefix's windows, not clustered again
    assert kv2["clustered_windows"] == kv["clustered_windows"]
    # Freeing the slots drops every window index; nothing leaks.
    assert engine.flush_cache()
    kv3 = engine.get_server_info()["kv_cache"]
    assert kv3["indexed_windows"] == 0 and kv3["free_slots"] == kv3["total_slots"]
    engine.shutdown()


def test_triton_kernels_give_the_torch_kernels_tokens(tiny_llama_dir: str) -> None:
    # --clusterkv-kernel triton: k-means and selection as Triton kernels (through the
    # interpreter on the CPU) select the same slots, so the tokens are the same.
    prompts = [random_ids(256, 2) + random_ids(20, 3), random_ids(150, 5)]
    runs = {}
    for kernel in ("torch", "triton"):
        engine = _clusterkv(tiny_llama_dir, clusterkv_kernel=kernel)
        out = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
        runs[kernel] = (out, engine.get_server_info()["kv_cache"])
        engine.shutdown()
    (want, kv_want), (got, kv_got) = runs["torch"], runs["triton"]
    assert kv_got["clustered_windows"] == kv_want["clustered_windows"] == 276 // 64 + 150 // 64
    assert kv_got["selected_share"] == kv_want["selected_share"] and 0 < kv_got["selected_share"] < 1
    for a, b in zip(got, want):
        assert a["output_ids"] == b["output_ids"]
        lp_a = [x for x, _, _ in a["meta_info"]["output_token_logprobs"]]
        lp_b = [x for x, _, _ in b["meta_info"]["output_token_logprobs"]]
        assert lp_a == pytest.approx(lp_b, abs=1e-5)


def test_clusterkv_passkey_at_a_20_percent_budget(default_model_path: str) -> None:
    engine = Engine(model_path=default_model_path, max_total_tokens=5000, log_level="warning",
                    kv_compression="clusterkv", clusterkv_budget=400)
    params = {"temperature": 0, "max_new_tokens": 8}
    for key, depth in [(71432, 0.25), (50918, 0.75)]:
        prompt = passkey_prompt(engine.tokenizer, key, 2000, depth)
        assert str(key) in engine.generate(prompt, sampling_params=params)["text"]
    kv = engine.get_server_info()["kv_cache"]
    assert kv["selected_share"] < 0.3
    engine.shutdown()


def test_clusterkv_flags_are_checked() -> None:
    from sglang_chelsea.server_args import ServerArgs

    with pytest.raises(ValueError, match="multiple of the page size"):
        ServerArgs(kv_compression="clusterkv", clusterkv_window=100)
    assert math.isclose(ServerArgs(kv_compression="clusterkv").clusterkv_budget, 2048)
    with pytest.raises(ValueError, match="clusterkv_kernel must be torch or triton"):
        ServerArgs(kv_compression="clusterkv", clusterkv_kernel="cuda")


def test_clusterkv_triton_kernel_on_cpu_without_interpreter_is_a_clear_error(monkeypatch) -> None:
    from sglang_chelsea.server_args import ServerArgs

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="clusterkv_kernel 'triton' needs --device cuda"):
        ServerArgs(kv_compression="clusterkv", clusterkv_kernel="triton", device="cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ServerArgs(kv_compression="clusterkv", clusterkv_kernel="triton", device="cpu")


def test_host_rows_all_masked_for_a_head_add_nothing() -> None:
    """A query head with no live host row (all host biases -inf) attends to its device slots
    only, exactly as if it had no host rows at all."""
    from sglang_chelsea.mem_cache.host_pool import HostKVPool

    torch.manual_seed(0)
    pool = MHATokenToKVPool(40, 1, 2, 8, torch.float32)
    pool.k_buffer[0].normal_()
    pool.v_buffer[0].normal_()
    host = HostKVPool(20, 1, 2, 8, torch.float32)
    host.k_buffer[0].normal_()
    host.v_buffer[0].normal_()
    backend = TorchNativeAttnBackend()
    backend.host_pool = host
    q = torch.randn(1, 4, 8)
    slots = torch.arange(1, 11)
    host_slots = torch.arange(1, 7).expand(4, -1)
    host_bias = torch.zeros(4, 6)
    host_bias[1] = float("-inf")  # head 1 recalls nothing
    with_host = Selection(slots, host_slots=host_slots, host_log_weight=host_bias)
    got = backend._attend_selection(pool, 0, q, with_host, 0.3)[0][0]
    alone = backend._attend_selection(pool, 0, q, Selection(slots), 0.3)[0][0]
    assert torch.allclose(got[1], alone[1], atol=1e-6)
    assert not torch.allclose(got[0], alone[0], atol=1e-3)  # a live head does use its rows
