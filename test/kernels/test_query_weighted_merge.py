"""Query-weighted centroids (kernels/query_weighted_merge.py) against their definition."""

from __future__ import annotations

import torch

from sglang_chelsea.kernels.query_weighted_merge import query_medoids, query_weighted_centroids


def _case(b: int = 3, c: int = 12, d: int = 8, m: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, c, d, generator=g)
    values = torch.randn(b, c, d + 2, generator=g)
    # Every slot gets at least one member: slots 0..m-1 first, then random ones.
    assignment = torch.cat([torch.arange(m).expand(b, m),
                            torch.randint(0, m, (b, c - m), generator=g)], dim=1)
    query = torch.randn(b, d, generator=g)
    sizes = torch.rand(b, c, generator=g) * 3 + 0.5
    return keys, values, assignment, m, query, sizes


def test_equals_a_softmax_inside_each_cluster() -> None:
    keys, values, assignment, m, query, sizes = _case()
    scale = 0.35
    out_k, out_v = query_weighted_centroids(keys, values, assignment, m, query, scale, sizes)
    for b in range(keys.shape[0]):
        for slot in range(m):
            members = (assignment[b] == slot).nonzero().flatten()
            w = sizes[b, members] * torch.exp(scale * keys[b, members] @ query[b])
            w = w / w.sum()
            assert torch.allclose(out_k[b, slot], w @ keys[b, members], atol=1e-5)
            assert torch.allclose(out_v[b, slot], w @ values[b, members], atol=1e-5)


def test_zero_query_is_the_size_weighted_mean() -> None:
    keys, values, assignment, m, _, sizes = _case(seed=1)
    out_k, out_v = query_weighted_centroids(keys, values, assignment, m,
                                            torch.zeros(keys.shape[0], keys.shape[2]), 1.0,
                                            sizes)
    total = torch.zeros(keys.shape[0], m).scatter_add_(1, assignment, sizes)
    mean_v = torch.zeros(keys.shape[0], m, values.shape[2]).scatter_add_(
        1, assignment[..., None].expand(-1, -1, values.shape[2]), sizes[..., None] * values)
    assert torch.allclose(out_v, mean_v / total[..., None], atol=1e-5)


def test_large_logits_stay_finite_and_pick_the_best_aligned_member() -> None:
    keys, values, assignment, m, query, _ = _case(seed=2)
    out_k, out_v = query_weighted_centroids(keys, values, assignment, m, query * 1e4, 1.0)
    assert torch.isfinite(out_k).all() and torch.isfinite(out_v).all()
    logits = torch.einsum("bcd,bd->bc", keys, query)
    for b in range(keys.shape[0]):
        for slot in range(m):
            members = (assignment[b] == slot).nonzero().flatten()
            best = members[logits[b, members].argmax()]
            assert torch.allclose(out_v[b, slot], values[b, best], atol=1e-5)


def test_identical_keys_keep_the_plain_mean_and_empty_slots_are_zero() -> None:
    # Members with one key get the same weight whatever the query: their values' mean.
    key = torch.randn(6)
    keys = key.expand(1, 4, 6).clone()
    values = torch.arange(4 * 3, dtype=torch.float32).view(1, 4, 3)
    assignment = torch.tensor([[0, 0, 0, 0]])
    out_k, out_v = query_weighted_centroids(keys, values, assignment, 2, torch.randn(1, 6), 0.5)
    assert torch.allclose(out_k[0, 0], key)
    assert torch.allclose(out_v[0, 0], values[0].mean(0))
    assert (out_k[0, 1] == 0).all() and (out_v[0, 1] == 0).all()


def test_half_precision_in_half_precision_out() -> None:
    keys, values, assignment, m, query, _ = _case(seed=3)
    out_k, out_v = query_weighted_centroids(keys.bfloat16(), values.bfloat16(), assignment, m,
                                            query, 0.35)
    ref_k, ref_v = query_weighted_centroids(keys.bfloat16().float(), values.bfloat16().float(),
                                            assignment, m, query, 0.35)
    assert out_k.dtype == out_v.dtype == torch.bfloat16
    assert torch.allclose(out_k.float(), ref_k, atol=2e-2)
    assert torch.allclose(out_v.float(), ref_v, atol=2e-2)


def test_medoid_is_the_member_the_query_attends_most() -> None:
    keys, values, assignment, m, query, _ = _case(seed=4)
    out_k, out_v = query_medoids(keys, values, assignment, m, query)
    for b in range(keys.shape[0]):
        for slot in range(m):
            members = (assignment[b] == slot).nonzero().flatten()
            best = members[(keys[b, members] @ query[b]).argmax()]
            assert torch.equal(out_k[b, slot], keys[b, best])
            assert torch.equal(out_v[b, slot], values[b, best])


def test_medoid_is_the_sharp_limit_of_the_weighted_centroid() -> None:
    keys, values, assignment, m, query, _ = _case(seed=5)
    sharp_k, sharp_v = query_weighted_centroids(keys, values, assignment, m, query, 1e5)
    out_k, out_v = query_medoids(keys, values, assignment, m, query)
    assert torch.allclose(out_k, sharp_k, atol=1e-4)
    assert torch.allclose(out_v, sharp_v, atol=1e-4)


def test_medoid_ties_take_the_lowest_position_and_empty_slots_are_zero() -> None:
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]])
    values = torch.arange(8.0).view(1, 4, 2)
    assignment = torch.tensor([[1, 1, 0, 1]])  # slot 2 gets no member
    out_k, out_v = query_medoids(keys, values, assignment, 3, torch.tensor([[1.0, 0.0]]))
    assert torch.equal(out_v[0, 1], values[0, 0])  # positions 0 and 1 tie: 0 wins
    assert torch.equal(out_v[0, 0], values[0, 2])
    assert torch.equal(out_k[0, 2], torch.zeros(2)) and torch.equal(out_v[0, 2], torch.zeros(2))
