"""ClusterKV's per-query-head cluster selection under a token budget, torch reference.

Each query head scores every centroid of its KV head by ``q . centroid``, ranks the
clusters by score (ties: lower cluster index first) and takes their tokens in rank order
(within a cluster, in position order) until ``budget`` tokens are taken: whole clusters,
the last one cut to fit.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["select_cluster_tokens"]


def select_cluster_tokens(q: Tensor, centroids: Tensor, labels: Tensor, budget: int) -> Tensor:
    """Positions (into the clustered tokens) each query head attends to.

    Args:
        q: ``[Hq, D]`` one decode query per query head.
        centroids: ``[Hkv, K, D]`` cluster centroids per KV head (``Hq % Hkv == 0``).
        labels: ``[Hkv, n]`` int64 cluster of each clustered token, per KV head.
        budget: tokens to select per query head.

    Returns:
        ``[Hq, min(budget, n)]`` int64 positions in ``[0, n)``, distinct per row, in
        selection order.
    """
    n_q, _ = q.shape
    n_kv, n_clusters, _ = centroids.shape
    group = n_q // n_kv
    n = labels.shape[1]
    take = min(budget, n)
    scores = torch.matmul(q.float().view(n_kv, group, -1),
                          centroids.float().transpose(1, 2)).view(n_q, n_clusters)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(n_clusters, device=q.device).expand(n_q, -1))
    token_rank = rank.gather(1, labels.repeat_interleave(group, dim=0))  # [Hq, n]
    key = token_rank * n + torch.arange(n, device=q.device)
    return torch.topk(key, take, dim=-1, largest=False, sorted=True).indices
