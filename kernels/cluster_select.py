"""ClusterKV's per-query-head cluster selection under a token budget, torch reference.

Each query head scores every centroid of its KV head by ``q . centroid``, ranks the
clusters by score (ties: lower cluster index first) and takes their tokens in rank order
(within a cluster, in position order) until ``budget`` tokens are taken: whole clusters,
the last one cut to fit.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cluster_member_lists", "cluster_members", "cluster_token_mask", "kv_head_union",
           "select_cluster_tokens", "select_cluster_tokens_batched"]


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


def cluster_members(labels: Tensor, n_clusters: int) -> tuple[Tensor, Tensor]:
    """``(sizes [..., K], within [..., n])`` int64 for ``labels [..., n]`` (values in
    ``[0, K)``): each cluster's size, and each token's index among its cluster's tokens
    in position order. Query-independent: computed once per index update."""
    n = labels.shape[-1]
    flat = labels.reshape(-1, n).to(torch.int64)
    m = flat.shape[0]
    sizes = torch.zeros(m, n_clusters, dtype=torch.int64, device=labels.device)
    sizes.scatter_add_(1, flat, torch.ones_like(flat))
    order = torch.sort(flat, dim=1, stable=True).indices  # by cluster, then position
    starts = sizes.cumsum(1) - sizes
    rank_in_sorted = torch.arange(n, device=labels.device).expand(m, n)
    within = torch.empty_like(flat).scatter_(
        1, order, rank_in_sorted - starts.gather(1, flat.gather(1, order)))
    return sizes.view(*labels.shape[:-1], n_clusters), within.view(labels.shape)


def cluster_token_mask(q: Tensor, centroids: Tensor, labels: Tensor, budget: int,
                       members: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The set :func:`select_cluster_tokens` selects, as a mask: ``[Hq, n]`` bool, True
    where query head ``h`` attends to clustered token ``t``.

    Token ``t`` would be output ``offset[h, label[t]] + within[t]``, where ``offset`` is the
    total size of the clusters ranked ahead of its cluster; it is selected when that is
    below the budget. ``O(K log K + n)`` per query head, no top-k over the tokens.
    ``members``: :func:`cluster_members` of ``labels`` when the caller has it already.
    """
    n_q, dim = q.shape
    n_kv, n_clusters, _ = centroids.shape
    group = n_q // n_kv
    n = labels.shape[1]
    sizes, within = members if members is not None else cluster_members(labels, n_clusters)
    scores = torch.matmul(q.float().view(n_kv, group, dim),
                          centroids.float().transpose(1, 2))  # [Hkv, g, K]
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranked = sizes.unsqueeze(1).expand(n_kv, group, n_clusters).gather(-1, order)
    offset = torch.empty_like(order).scatter_(-1, order, ranked.cumsum(-1) - ranked)
    out_pos = offset.gather(-1, labels.unsqueeze(1).expand(n_kv, group, n))
    out_pos += within.unsqueeze(1)
    return (out_pos < budget).view(n_q, n)


def kv_head_union(mask: Tensor, n_kv: int) -> tuple[Tensor, Tensor]:
    """Each KV head's union of its query heads' selections, for reading each selected
    token once per KV head instead of once per query head.

    Args:
        mask: ``[Hq, n]`` bool (:func:`cluster_token_mask`), query heads grouped by KV head.
        n_kv: KV heads (``Hq % n_kv == 0``).

    Returns:
        ``pos [Hkv, u]`` int64 token positions (each KV head's union in position order,
        padded with position 0 to the largest union ``u``) and ``bias [Hq, u]`` float32: 0
        where query head ``h`` selected ``pos[kv(h), j]``, ``-inf`` elsewhere and on padding.
    """
    n_q, n = mask.shape
    group = n_q // n_kv
    per_head = mask.view(n_kv, group, n)
    union = per_head.view(torch.uint8).amax(dim=1).view(torch.bool)  # [Hkv, n] (any)
    counts = union.sum(dim=1)
    width = int(counts.max())
    head, tok = union.nonzero(as_tuple=True)  # sorted by head, then position
    starts = counts.cumsum(0) - counts
    col = torch.arange(head.numel(), device=mask.device) - starts[head]
    pos = torch.zeros(n_kv, width, dtype=torch.int64, device=mask.device)
    pos[head, col] = tok
    live = torch.arange(width, device=mask.device) < counts[:, None]  # [Hkv, u]
    chosen = per_head.gather(2, pos.unsqueeze(1).expand(n_kv, group, width))
    chosen &= live.unsqueeze(1)
    bias = torch.where(chosen, 0.0, float("-inf"))
    return pos, bias.view(n_q, width)


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
