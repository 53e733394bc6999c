"""Batched ClusterKV selection from member lists equals the per-request torch reference:
requests of different cluster counts and lengths padded together, empty clusters, tied
scores (duplicate centroids), and a budget one short of a request's length."""

from __future__ import annotations

import torch

from sglang_chelsea.kernels.cluster_select import (cluster_member_lists, select_cluster_tokens,
                                                   select_cluster_tokens_batched)


def test_batched_selection_equals_per_request_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    n_q, n_kv, dim, budget = 8, 2, 16, 40
    reqs = []
    for n, k in [(100, 7), (41, 5), (150, 12), (64, 30)]:
        cent = torch.randn(n_kv, k, dim, generator=gen)
        cent[:, 1] = cent[:, 0]  # tied scores: the lower cluster id ranks first
        labels = torch.randint(0, k - 2, (n_kv, n), generator=gen)  # the last 2 stay empty
        reqs.append((cent, labels))
    q = torch.randn(len(reqs), n_q, dim, generator=gen)
    k_max = max(c.shape[1] for c, _ in reqs)
    n_max = max(lab.shape[1] for _, lab in reqs)
    b = len(reqs)
    cent = torch.zeros(b, n_kv, k_max, dim)
    valid = torch.zeros(b, n_kv, k_max, dtype=torch.bool)
    sizes = torch.zeros(b, n_kv, k_max, dtype=torch.int64)
    starts = torch.zeros_like(sizes)
    members = torch.zeros(b, n_kv, n_max, dtype=torch.int64)
    for i, (c, lab) in enumerate(reqs):
        k, n = c.shape[1], lab.shape[1]
        cent[i, :, :k], valid[i, :, :k] = c, True
        s, st, m = cluster_member_lists(lab, k)
        assert torch.equal(s.sum(-1), torch.full((n_kv,), n))
        sizes[i, :, :k], starts[i, :, :k], members[i, :, :n] = s, st, m
    got = select_cluster_tokens_batched(q, cent, valid, sizes, starts, members, budget)
    assert got.shape == (b, n_q, budget)
    for i, (c, lab) in enumerate(reqs):
        assert torch.equal(got[i], select_cluster_tokens(q[i], c, lab, budget))
