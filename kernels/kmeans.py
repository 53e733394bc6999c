"""Batched cosine k-means over post-RoPE keys (ClusterKV's clustering), torch reference.

Assignment by cosine similarity to the centroids, centroid = mean of the raw keys assigned
to it (as ClusterKV's code does), a fixed number of iterations, deterministic start
(``k`` keys evenly spaced along the sequence), so the same keys always give the same
clusters. An empty cluster keeps its previous centroid and gets size 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["KMeansResult", "check_kmeans_args", "cosine_kmeans", "initial_centroids"]

NORM_EPS = 1e-6


@dataclass
class KMeansResult:
    """``centroids [B, k, D]`` (float32), ``labels [B, n]`` (int64), ``sizes [B, k]`` (int64)."""

    centroids: Tensor
    labels: Tensor
    sizes: Tensor


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def check_kmeans_args(keys: Tensor, k: int) -> None:
    """Raise ValueError unless ``keys`` is ``[B, n, D]`` and ``1 <= k <= n``."""
    if keys.dim() != 3:
        raise ValueError(f"keys must be [B, n, D], got {tuple(keys.shape)}")
    n = keys.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")


def initial_centroids(x: Tensor, k: int) -> Tensor:
    """The deterministic start: a copy of the ``k`` keys of ``x [B, n, D]`` evenly spaced
    along the sequence."""
    start = torch.linspace(0, x.shape[1] - 1, k, device=x.device).round().long()
    return x[:, start].clone()


def cosine_kmeans(keys: Tensor, k: int, iters: int = 10) -> KMeansResult:
    """Cluster each of the ``B`` rows of ``keys [B, n, D]`` into ``k <= n`` clusters."""
    check_kmeans_args(keys, k)
    b, n, d = keys.shape
    x = keys.float()
    xn = _unit(x)
    centroids = initial_centroids(x, k)
    labels = torch.zeros(b, n, dtype=torch.long, device=keys.device)
    flat = (labels + (torch.arange(b, device=keys.device) * k)[:, None]).view(-1)
    for _ in range(max(1, iters)):
        labels = torch.matmul(xn, _unit(centroids).transpose(1, 2)).argmax(dim=-1)  # [B, n]
        flat = (labels + (torch.arange(b, device=keys.device) * k)[:, None]).view(-1)
        sums = torch.zeros(b * k, d, device=keys.device).index_add_(0, flat, x.view(-1, d))
        counts = torch.zeros(b * k, device=keys.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.float32))
        filled = counts > 0
        mean = sums / counts.clamp_min(1.0)[:, None]
        centroids = torch.where(filled[:, None], mean, centroids.view(-1, d)).view(b, k, d)
    sizes = torch.zeros(b * k, dtype=torch.long, device=keys.device).index_add_(
        0, flat, torch.ones_like(flat)).view(b, k)
    return KMeansResult(centroids=centroids, labels=labels, sizes=sizes)
