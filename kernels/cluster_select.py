"""ClusterKV's per-query-head cluster selection under a token budget, torch reference.

Each query head scores every centroid of its KV head by ``q . centroid``, ranks the
clusters by score (ties: lower cluster index first) and takes their tokens in rank order
(within a cluster, in position order) until ``budget`` tokens are taken: whole clusters,
the last one cut to fit.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cluster_member_lists", "select_cluster_tokens", "select_cluster_tokens_batched"]


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


def cluster_member_lists(labels: Tensor, n_clusters: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each cluster's members as one sorted list (CSR), computed once per index update.

    Args:
        labels: ``[..., n]`` int64 cluster of each clustered token.
        n_clusters: clusters per row (ids in ``[0, n_clusters)``).

    Returns:
        ``sizes [..., K]``, ``starts [..., K]`` (first entry of each cluster in ``members``)
        and ``members [..., n]``: token positions grouped by cluster id, in position order
        within a cluster.
    """
    members = torch.sort(labels, dim=-1, stable=True).indices
    sizes = torch.zeros(*labels.shape[:-1], n_clusters, dtype=torch.int64, device=labels.device)
    sizes.scatter_add_(-1, labels, torch.ones_like(labels))
    starts = sizes.cumsum(-1) - sizes
    return sizes, starts, members


def select_cluster_tokens_batched(q: Tensor, centroids: Tensor, valid: Tensor, sizes: Tensor,
                                  starts: Tensor, members: Tensor, budget: int) -> Tensor:
    """:func:`select_cluster_tokens` for a batch of requests at once, from member lists.

    Requests are padded to the most clusters (``valid`` False on padding, size 0) and
    tokens; every request must have more than ``budget`` clustered tokens. The work is
    ``O(K log K + budget log K)`` per query head, not ``O(n)``: the clusters are ranked,
    their sizes summed in rank order, and output ``j`` is member ``j - (tokens of the
    clusters ranked ahead)`` of the cluster where that sum passes ``j``.

    Args:
        q: ``[B, Hq, D]`` one decode query per request and query head.
        centroids: ``[B, Hkv, K, D]``; ``valid``: ``[B, Hkv, K]`` bool.
        sizes, starts: ``[B, Hkv, K]`` int64; ``members``: ``[B, Hkv, n]`` int64
            (:func:`cluster_member_lists` of each request, padded).
        budget: tokens to select per query head.

    Returns:
        ``[B, Hq, budget]`` int64 positions, equal row by row to
        :func:`select_cluster_tokens` of each request.
    """
    bsz, n_q, dim = q.shape
    n_kv, n_clusters = centroids.shape[1], centroids.shape[2]
    group = n_q // n_kv
    scores = torch.matmul(q.float().view(bsz, n_kv, group, dim),
                          centroids.float().transpose(-1, -2))  # [B, Hkv, g, K]
    scores.masked_fill_(~valid.unsqueeze(2), float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    expand = (bsz, n_kv, group, n_clusters)
    ranked_sizes = sizes.unsqueeze(2).expand(expand).gather(-1, order)
    cum = ranked_sizes.cumsum(-1)  # tokens of the clusters ranked up to each
    j = torch.arange(budget, device=q.device).expand(bsz, n_kv, group, budget).contiguous()
    rank = torch.searchsorted(cum, j, right=True)  # the cluster holding output j
    before = torch.where(rank > 0, cum.gather(-1, (rank - 1).clamp(min=0)), 0)
    cluster = order.gather(-1, rank)
    first = starts.unsqueeze(2).expand(expand).gather(-1, cluster)
    pos = members.unsqueeze(2).expand(bsz, n_kv, group, members.shape[-1]).gather(
        -1, first + j - before)
    return pos.view(bsz, n_q, budget)
