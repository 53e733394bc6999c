"""ClusterKV's decode selection for a whole batch per layer (the GPU backend's fast lane).

Selecting request by request costs about 25 small ops per (layer, request), so on a GPU
a batch-16 decode step was bound by launching them (215 ms at 8k; docs/gpu.md). Here one
layer's selection for every request is a fixed handful of batched ops:

- :class:`BatchIndex`: the selecting requests' cluster indexes (centroids, member lists,
  clustered slots), padded and stacked per layer, rebuilt only when the set of requests
  or one of their indexes changes (a window completes).
- :class:`BatchPlan`: the step's list layout, the same in every selecting layer: row
  ``b * q_heads + h`` is the request's sinks and unclustered tail followed by the head's
  ``budget`` chosen tokens (a request that does not select: its whole list), expressed
  as one gather from ``cat(kv_indices, chosen)`` built on the host once per step.
- :func:`select_batch`: ranks clusters for all requests at once
  (:func:`select_cluster_tokens_batched`) and gathers the lists.

The lists equal what :meth:`ClusterKVSelector.select` gives request by request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sglang_chelsea.attention.slot_lists import indptr_of
from sglang_chelsea.compression.base import BatchSelection
from sglang_chelsea.kernels.cluster_select import (cluster_member_lists,
                                                   select_cluster_tokens_batched)

if TYPE_CHECKING:
    from sglang_chelsea.compression.clusterkv import ReqIndex


@dataclass
class BatchIndex:
    """Cluster indexes of the selecting requests, padded: ``[layers, S, kv_heads, ...]``."""

    key: tuple[int, ...]  # the indexes' versions, in batch order
    centroids: torch.Tensor  # [L', S, Hkv, Kmax, D]
    valid: torch.Tensor  # [L', S, Hkv, Kmax] bool
    sizes: torch.Tensor  # [L', S, Hkv, Kmax] int64
    starts: torch.Tensor  # [L', S, Hkv, Kmax] int64
    members: torch.Tensor  # [L', S, Hkv, nmax] int64
    slots: torch.Tensor  # [S, nmax] int64 clustered tokens' slots


def build_batch_index(states: list["ReqIndex"], device: torch.device) -> BatchIndex:
    """Pad and stack the requests' indexes (member lists computed once per index)."""
    first = states[0].centroids
    assert first is not None
    layers, kv_heads, _, dim = first.shape
    k_max = max(s.centroids.shape[2] for s in states)
    n_max = max(s.slots.numel() for s in states)
    shape = (layers, len(states), kv_heads)
    out = BatchIndex(
        key=tuple(s.version for s in states),
        centroids=torch.zeros(*shape, k_max, dim, dtype=first.dtype, device=device),
        valid=torch.zeros(*shape, k_max, dtype=torch.bool, device=device),
        sizes=torch.zeros(*shape, k_max, dtype=torch.int64, device=device),
        starts=torch.zeros(*shape, k_max, dtype=torch.int64, device=device),
        members=torch.zeros(*shape, n_max, dtype=torch.int64, device=device),
        slots=torch.zeros(len(states), n_max, dtype=torch.int64, device=device))
    for i, s in enumerate(states):
        k, n = s.centroids.shape[2], s.slots.numel()
        if s.member_lists is None:
            s.member_lists = cluster_member_lists(s.labels, k)
        sizes, starts, members = s.member_lists
        out.centroids[:, i, :, :k] = s.centroids
        out.valid[:, i, :, :k] = True
        out.sizes[:, i, :, :k] = sizes
        out.starts[:, i, :, :k] = starts
        out.members[:, i, :, :n] = members
        out.slots[i, :n] = s.slots_on(device)
    return out


@dataclass
class BatchPlan:
    """One decode step's per-(request, query head) list layout."""

    selecting: list[int]  # batch rows whose heads select
    rows: torch.Tensor  # the same, on the device (rows of q)
    src: torch.Tensor  # [entries] int64: gather index into cat(kv_indices, chosen)
    indptr: torch.Tensor  # [B * q_heads + 1] int32
    bias: torch.Tensor  # [entries] float32 zeros (uniform slot weights)
    max_len: int


def plan_batch(states: list["ReqIndex | None"], offsets: list[int], n_q: int, budget: int,
               sink_tokens: int, n_source: int, device: torch.device) -> BatchPlan | None:
    """The step's layout; None when no request selects. ``states[i]`` is request ``i``'s
    index (None: not indexed), ``offsets`` its list's span in ``kv_indices`` (``n_source``
    entries; the chosen tokens follow them in the gather source)."""
    selecting = [i for i, s in enumerate(states)
                 if s is not None and s.slots is not None and budget < s.slots.numel()]
    if not selecting:
        return None
    parts, lens = [], []
    heads = torch.arange(n_q)[:, None]
    for i, s in enumerate(states):
        lo, hi = offsets[i], offsets[i + 1]
        if i in selecting:
            assert s is not None
            fixed = torch.cat([torch.arange(lo, lo + min(sink_tokens, hi - lo)),
                               torch.arange(lo + s.end, hi)])
            chosen = (n_source + (selecting.index(i) * n_q + heads) * budget
                      + torch.arange(budget)[None, :])
            rows = torch.cat([fixed.expand(n_q, -1), chosen], dim=1)
        else:
            rows = torch.arange(lo, hi).expand(n_q, -1)
        parts.append(rows.reshape(-1))
        lens += [rows.shape[1]] * n_q
    src = torch.cat(parts)
    return BatchPlan(selecting, torch.tensor(selecting, device=device), src.to(device),
                     indptr_of(lens).to(device), torch.zeros(src.numel(), device=device),
                     max(lens))


def select_batch(plan: BatchPlan, index: BatchIndex, layer: int, q: torch.Tensor,
                 kv_indices: torch.Tensor, budget: int) -> BatchSelection:
    """Every request's lists in clustered layer ``layer`` (decode queries ``q [B, Hq, D]``)."""
    pos = select_cluster_tokens_batched(
        q.index_select(0, plan.rows), index.centroids[layer], index.valid[layer],
        index.sizes[layer], index.starts[layer], index.members[layer], budget)
    chosen = index.slots.gather(1, pos.view(pos.shape[0], -1))
    source = torch.cat([kv_indices.to(torch.int64), chosen.view(-1)])
    return BatchSelection(plan.indptr, source[plan.src].to(torch.int32), plan.bias, plan.max_len)
