"""ClusterKV's CPU selection lane: the per-query-head selection as a mask, and each KV
head's union of its query heads' selections with a per-query-head mask, equal the torch
reference's token sets (tied scores, empty clusters, budgets cutting a cluster or covering
everything); attention over the union lists equals attention over per-head lists."""

from __future__ import annotations

import pytest
import torch

from sglang_chelsea.attention.torch_backend import TorchNativeAttnBackend, masked_attention
from sglang_chelsea.compression.base import Selection
from sglang_chelsea.kernels.cluster_select import (cluster_members, cluster_token_mask,
                                                   kv_head_union, select_cluster_tokens)
from sglang_chelsea.mem_cache.memory_pool import MHATokenToKVPool


def _case(seed: int, n_q: int, n_kv: int, n: int, k: int, dim: int = 16):
    gen = torch.Generator().manual_seed(seed)
    cent = torch.randn(n_kv, k, dim, generator=gen)
    cent[:, 1] = cent[:, 0]  # tied scores: the lower cluster id ranks first
    labels = torch.randint(0, k - 1, (n_kv, n), generator=gen)  # the last cluster stays empty
    q = torch.randn(n_q, dim, generator=gen)
    return q, cent, labels


@pytest.mark.parametrize("budget", [1, 17, 40, 99, 100, 500])
def test_mask_and_union_hold_the_reference_sets(budget: int) -> None:
    n_q, n_kv, n, k = 8, 2, 100, 9
    q, cent, labels = _case(budget, n_q, n_kv, n, k)
    want = select_cluster_tokens(q, cent, labels, budget)
    mask = cluster_token_mask(q, cent, labels, budget)
    assert mask.shape == (n_q, n)
    expected = torch.zeros(n_q, n, dtype=torch.bool).scatter_(1, want, True)
    assert torch.equal(mask, expected)
    # Precomputed members give the same mask.
    assert torch.equal(mask, cluster_token_mask(q, cent, labels, budget,
                                                cluster_members(labels, k)))
    pos, bias = kv_head_union(mask, n_kv)
    group = n_q // n_kv
    for h in range(n_q):
        kv = h // group
        live = pos[kv][bias[h] == 0]
        assert sorted(live.tolist()) == sorted(want[h].tolist())  # exactly its own set
    for kv in range(n_kv):
        union = mask[kv * group:(kv + 1) * group].any(0).nonzero().flatten()
        count = union.numel()
        assert torch.equal(pos[kv, :count], union)  # position order, no repeats
        assert torch.isneginf(bias[kv * group:(kv + 1) * group, count:]).all()  # padding
    assert pos.shape[1] == max(int(mask[i * group:(i + 1) * group].any(0).sum())
                               for i in range(n_kv))


def test_attention_over_union_lists_equals_per_head_lists() -> None:
    torch.manual_seed(0)
    n_q, n_kv, dim, n = 6, 2, 8, 50
    pool = MHATokenToKVPool(80, 1, n_kv, dim, torch.float32)
    pool.k_buffer[0].normal_()
    pool.v_buffer[0].normal_()
    slots = torch.randperm(79)[:n] + 1  # the clustered tokens' slots, in row order
    fixed = torch.tensor([3, 80, 7])  # sinks + tail, attended by every head (some reused)
    q, cent, labels = _case(1, n_q, n_kv, n, 6, dim)
    budget = 12
    per_head = slots[select_cluster_tokens(q, cent, labels, budget)]
    backend = TorchNativeAttnBackend()
    want = backend._attend_selection(
        pool, 0, q[None], Selection(torch.cat([fixed.expand(n_q, -1), per_head], 1)), 0.3)[0][0]
    pos, bias = kv_head_union(cluster_token_mask(q, cent, labels, budget), n_kv)
    union = Selection(torch.cat([fixed.expand(n_kv, -1), slots[pos]], 1),
                      log_weight=torch.cat([torch.zeros(n_q, 3), bias], 1), kv_head_lists=True)
    got = backend._attend_selection(pool, 0, q[None], union, 0.3)[0][0]
    assert torch.allclose(got, want, atol=1e-6)
    # The union form expands to per-query-head lists for the GPU backends.
    expanded = union.query_head_slots(n_q)
    assert expanded.shape == (n_q, 3 + pos.shape[1])
    ref = masked_attention(q[:, None], pool.k_buffer[0].repeat_interleave(3, 0)[
        torch.arange(n_q)[:, None], expanded], pool.v_buffer[0].repeat_interleave(3, 0)[
        torch.arange(n_q)[:, None], expanded], union.log_weight[:, None], 0.3)[:, 0]
    assert torch.allclose(got, ref, atol=1e-6)
