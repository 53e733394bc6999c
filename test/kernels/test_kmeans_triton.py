"""ClusterKV's cosine k-means in Triton (kernels/kmeans_triton.py) against the torch
reference: the same labels and sizes, centroids within float32 rounding.

On a machine without a GPU the kernels run through the Triton interpreter on CPU tensors
(tiny grids: the interpreter's cost is per program)."""

from __future__ import annotations

import pytest
import torch
from sglang_chelsea.kernels.kmeans import KMeansResult, cosine_kmeans
from torch import Tensor
from utils.triton_env import DEV, require_triton


@pytest.fixture(autouse=True)
def _triton() -> None:
    require_triton()


def _triton_kmeans(keys: Tensor, k: int, iters: int, **blocks: int) -> KMeansResult:
    from sglang_chelsea.kernels.kmeans_triton import cosine_kmeans_triton

    return cosine_kmeans_triton(keys, k, iters, **blocks)


def _check_equal(keys: Tensor, k: int, iters: int, tol: float = 1e-5, **blocks: int) -> KMeansResult:
    ref = cosine_kmeans(keys, k, iters)
    got = _triton_kmeans(keys, k, iters, **blocks)
    assert got.labels.dtype == torch.int64 and got.sizes.dtype == torch.int64
    assert got.centroids.dtype == torch.float32 and got.centroids.shape == ref.centroids.shape
    assert torch.equal(got.labels, ref.labels)
    assert torch.equal(got.sizes, ref.sizes)
    torch.testing.assert_close(got.centroids, ref.centroids, rtol=tol, atol=tol)
    return got


def _planted(b: int, n: int, d: int, centres: int, noise: float, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.nn.functional.normalize(torch.randn(b, centres, d, generator=g), dim=-1)
    pick = torch.randint(0, centres, (b, n), generator=g)
    scale = 1 + torch.rand(b, n, 1, generator=g) * 4  # raw keys of varied norms
    keys = c.gather(1, pick[..., None].expand(-1, -1, d)) * scale
    return keys + noise * torch.randn(b, n, d, generator=g)


@pytest.mark.parametrize(("b", "n", "d", "k", "iters", "blocks"), [
    (3, 100, 24, 7, 5, {}),  # non-power-of-two n, D and k; one centroid block
    (2, 77, 40, 20, 4, {"block_n": 16, "block_k": 16}),  # several point and centroid blocks
    (1, 33, 16, 33, 2, {}),  # k = n
    (2, 50, 8, 1, 3, {}),  # k = 1, D below the 16-wide block
])
def test_random_keys_match_reference(b: int, n: int, d: int, k: int, iters: int,
                                     blocks: dict) -> None:
    keys = torch.randn(b, n, d, generator=torch.Generator().manual_seed(n + k)) * 3
    _check_equal(keys.to(DEV), k, iters, **blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_planted_clusters_match_reference(dtype: torch.dtype) -> None:
    keys = _planted(4, 96, 32, centres=6, noise=0.05, seed=1).to(dtype)
    got = _check_equal(keys.to(DEV), 6, 10, block_n=32)
    assert got.sizes.sum(dim=1).tolist() == [96] * 4


def test_exact_ties_go_to_the_lowest_centroid_and_empty_clusters_keep_theirs() -> None:
    g = torch.Generator().manual_seed(3)
    b, n, d, k = 2, 40, 16, 20
    keys = torch.randn(b, n, d, generator=g)
    start = torch.linspace(0, n - 1, k).round().long()
    # Identical start keys: within one centroid block (1 = 0) and across blocks of 16
    # (17 = 2), so every point ties between them and the higher index stays empty.
    keys[:, start[1]] = keys[:, start[0]]
    keys[:, start[17]] = keys[:, start[2]]
    keys[1, 5] = 0.0  # a zero key: every cosine is 0, label 0
    # After one round the higher twin is empty and keeps its start centroid; later rounds
    # (the twins now differ) must follow the reference too.
    got = _check_equal(keys.to(DEV), k, 1, block_k=16)
    assert (got.sizes[:, 1] == 0).all() and (got.sizes[:, 17] == 0).all()
    torch.testing.assert_close(got.centroids[:, 17].cpu(), keys[:, start[17]])
    assert got.labels[1, 5] == 0
    _check_equal(keys.to(DEV), k, 3, block_k=16)


def test_argument_checks_are_the_reference_ones() -> None:
    with pytest.raises(ValueError, match="k must be in"):
        _triton_kmeans(torch.randn(1, 4, 16), 5, 1)
    with pytest.raises(ValueError, match=r"\[B, n, D\]"):
        _triton_kmeans(torch.randn(4, 16), 2, 1)
