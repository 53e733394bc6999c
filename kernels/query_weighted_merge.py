"""Query-weighted centroids: Chelsea's merge step, weighted by a query prior.

Chunked Soft Matching decides *which* tokens share a slot; this decides *what* the slot
holds. The plain centroid is the size-weighted mean of its members' keys and values, so
a member the model hardly attends to counts as much as one it attends to strongly. With a
query prior ``q`` (the model's mean post-RoPE query for that layer and KV head), each
member ``i`` instead counts with ``size_i * exp(scale * q . k_i)``: its share of the
attention a typical query gives the cluster. The slot's size (the log(size) bias) is
unchanged.

On SmolLM2-135M this cuts the attention-output error of the centroids by a third or more
at keep 0.5 to 0.1, whichever text the prior comes from; next-token KL falls 9-14% at keep
0.25-0.5 but rises 7% at keep 0.1, and needles far back in 8k prompts are lost more often
(``docs/benchmarks.md``, "Query-weighted centroids").

``query_medoids`` is the other choice of what a slot holds: the one member the prior
attends most, kept raw (the limit of the weighting above at an infinitely sharp
softmax). Chelsea stores a medoid with weight 1, not its cluster's size: the medoid's key
keeps its full norm, so the log(size) bias would count the cluster's mass twice. On
SmolLM2-135M, medoids with a long raw window beat StreamingLLM's KL at equal memory,
where means do not (``docs/benchmarks.md``, "Medoid representatives").
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["query_medoids", "query_weighted_centroids"]


def query_weighted_centroids(
    keys: Tensor,
    values: Tensor,
    assignment: Tensor,
    num_slots: int,
    query: Tensor,
    scale: float,
    sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Centroid keys and values of the clusters given by ``assignment``.

    Args:
        keys: ``[B, C, D]`` post-RoPE keys of ``B`` independent chunks.
        values: ``[B, C, Dv]`` their values.
        assignment: ``[B, C]`` int64, the slot (``0 <= slot < num_slots``) of each token.
        num_slots: ``M``, slots per chunk in the output.
        query: ``[B, D]`` the query prior of each chunk's layer and head.
        scale: the attention's logit scale (``head_dim ** -0.5``).
        sizes: ``[B, C]`` positive token weights (default 1), e.g. when members are
            centroids already.

    Returns:
        ``(keys [B, M, D], values [B, M, Dv])`` in the input dtype; a slot no token maps to
        is zero.
    """
    b, c, d = keys.shape
    k = keys.float()
    logits = torch.bmm(k, query.float().unsqueeze(-1)).squeeze(-1) * scale  # [B, C]
    # Softmax inside each cluster: subtract the cluster's largest logit first.
    top = torch.full((b, num_slots), float("-inf"), device=keys.device)
    top.scatter_reduce_(1, assignment, logits, "amax")
    weight = torch.exp(logits - top.gather(1, assignment))
    if sizes is not None:
        weight = weight * sizes.float()
    total = torch.zeros(b, num_slots, device=keys.device).scatter_add_(1, assignment, weight)
    norm = weight / total.gather(1, assignment)  # [B, C]: each member's share of its slot
    idx = assignment.unsqueeze(-1)
    out_k = torch.zeros(b, num_slots, d, device=keys.device)
    out_k.scatter_add_(1, idx.expand(-1, -1, d), norm.unsqueeze(-1) * k)
    dv = values.shape[-1]
    out_v = torch.zeros(b, num_slots, dv, device=keys.device)
    out_v.scatter_add_(1, idx.expand(-1, -1, dv), norm.unsqueeze(-1) * values.float())
    return out_k.to(keys.dtype), out_v.to(values.dtype)


def query_medoids(
    keys: Tensor,
    values: Tensor,
    assignment: Tensor,
    num_slots: int,
    query: Tensor,
) -> tuple[Tensor, Tensor]:
    """Each cluster's medoid: the member with the largest logit ``query . k`` (ties: the
    lowest position), its key and value unchanged.

    Args and shapes as for ``query_weighted_centroids`` (no scale is needed: the argmax
    does not depend on it).

    Returns:
        ``(keys [B, M, D], values [B, M, Dv])`` in the input dtype; a slot no token maps to
        is zero.
    """
    b, c, d = keys.shape
    logits = torch.bmm(keys.float(), query.float().unsqueeze(-1)).squeeze(-1)  # [B, C]
    top = torch.full((b, num_slots), float("-inf"), device=keys.device)
    top.scatter_reduce_(1, assignment, logits, "amax")
    is_top = logits >= top.gather(1, assignment)
    pos = torch.arange(c, device=keys.device).expand(b, c)
    # The lowest top position of each slot; c marks a slot no token maps to.
    first = torch.full((b, num_slots), c, dtype=torch.long, device=keys.device)
    first.scatter_reduce_(1, assignment, torch.where(is_top, pos, c), "amin")
    used = first < c
    src = first.clamp(max=c - 1)
    out_k = keys.gather(1, src.unsqueeze(-1).expand(-1, -1, d))
    out_v = values.gather(1, src.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
    mask = used.unsqueeze(-1).to(keys.dtype)
    return out_k * mask, out_v * mask.to(values.dtype)
