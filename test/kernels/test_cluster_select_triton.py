"""ClusterKV's budgeted cluster selection in Triton (kernels/cluster_select_triton.py)
against the torch reference: the same positions in the same order.

On a machine without a GPU the kernels run through the Triton interpreter on CPU tensors
(tiny grids: the interpreter's cost is per program)."""

from __future__ import annotations

import pytest
import torch
from sglang_chelsea.kernels.cluster_select import select_cluster_tokens
from sglang_chelsea.kernels.kmeans import cosine_kmeans
from torch import Tensor
from utils.triton_env import DEV, require_triton


@pytest.fixture(autouse=True)
def _triton() -> None:
    require_triton()


def _select(q: Tensor, centroids: Tensor, labels: Tensor, budget: int, **kw: object) -> Tensor:
    from sglang_chelsea.kernels.cluster_select_triton import select_cluster_tokens_triton

    q, centroids, labels = q.to(DEV), centroids.to(DEV), labels.to(DEV)
    want = select_cluster_tokens(q, centroids, labels, budget)
    got = select_cluster_tokens_triton(q, centroids, labels, budget, **kw)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got, want)
    return got


@pytest.mark.parametrize(("hq", "hkv", "k", "n", "d", "budgets", "blocks"), [
    (4, 2, 9, 100, 24, [1, 37, 99, 100, 1000], {}),  # one block of clusters and of tokens
    (6, 2, 40, 300, 40, [101, 250], {"block_c": 16, "block_n": 64}),  # several blocks, GQA 3
    (3, 3, 5, 50, 8, [17], {}),  # no GQA, D below the 16-wide block
    (2, 1, 70, 130, 16, [64], {"block_c": 32, "block_n": 32}),  # some clusters empty
])
def test_random_scores_match_reference(hq: int, hkv: int, k: int, n: int, d: int,
                                       budgets: list[int], blocks: dict) -> None:
    g = torch.Generator().manual_seed(k * n)
    q, centroids = torch.randn(hq, d, generator=g), torch.randn(hkv, k, d, generator=g)
    labels = torch.randint(0, k, (hkv, n), generator=g)
    for budget in budgets:
        _select(q, centroids, labels, budget, **blocks)


def test_planted_clusters_from_kmeans_match_reference() -> None:
    g = torch.Generator().manual_seed(7)
    hkv, group, n, d, k = 2, 3, 200, 32, 12
    centres = torch.nn.functional.normalize(torch.randn(hkv, k, d, generator=g), dim=-1)
    keys = centres.gather(1, torch.randint(0, k, (hkv, n, 1), generator=g).expand(-1, -1, d))
    keys = keys * 4 + 0.1 * torch.randn(hkv, n, d, generator=g)
    res = cosine_kmeans(keys, k, 10)
    # Each query head leans towards one planted centre.
    q = centres.repeat_interleave(group, 0)[torch.arange(hkv * group) // group,
                                            torch.arange(hkv * group) % k] * 8
    q = q + torch.randn(q.shape, generator=g)
    for budget in (10, 60, 150):
        _select(q.half(), res.centroids, res.labels, budget)


def test_exact_score_ties_rank_the_lower_cluster_first() -> None:
    g = torch.Generator().manual_seed(11)
    k, n, d = 24, 90, 16
    centroids = torch.randn(1, k, d, generator=g)
    centroids[0, 5] = centroids[0, 2]  # same block of 16
    centroids[0, 20] = centroids[0, 2]  # another block
    centroids[0, 9] = 0.0  # score 0 for every head
    centroids[0, 10] = 0.0
    labels = torch.randint(0, k, (1, n), generator=g)
    q = torch.randn(2, d, generator=g)
    q[1] = 0.0  # every score 0: rank = cluster index
    for budget in (7, 45, 89):
        got = _select(q, centroids, labels, budget, block_c=16, block_n=32)
        # Head 1 takes the clusters in index order, positions ascending in each.
        order = torch.sort(labels[0] * n + torch.arange(n)).indices[:budget]
        assert got[1].tolist() == order.tolist()


def test_known_answer() -> None:
    # The reference's own example (test/compression/test_clusterkv.py).
    centroids = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    labels = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1]])
    q = torch.tensor([[0.0, 2.0], [-3.0, 0.1]])
    got = _select(q, centroids, labels, 5)
    assert got.tolist() == [[1, 4, 7, 0, 3], [2, 5, 1, 4, 7]]


def test_members_and_empty_budget() -> None:
    from sglang_chelsea.kernels.cluster_select_triton import (
        cluster_members,
        select_cluster_tokens_triton,
    )

    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 6, (2, 3, 40), generator=g)  # [L, Hkv, n]
    sizes, within = cluster_members(labels, 8)
    assert sizes.shape == (2, 3, 8) and within.shape == labels.shape
    for row, s_row, w_row in zip(labels.view(-1, 40), sizes.view(-1, 8), within.view(-1, 40)):
        assert s_row.tolist() == torch.bincount(row, minlength=8).tolist()
        for p in range(40):  # index among the earlier tokens of the same cluster
            assert w_row[p] == int((row[:p] == row[p]).sum())
    q, centroids = torch.randn(6, 16, generator=g), torch.randn(3, 8, 16, generator=g)
    members = (sizes[1].to(DEV), within[1].to(DEV))
    _select(q, centroids, labels[1], 23, members=members)
    empty = select_cluster_tokens_triton(q.to(DEV), centroids.to(DEV), labels[1].to(DEV), 0)
    assert empty.shape == (6, 0)
