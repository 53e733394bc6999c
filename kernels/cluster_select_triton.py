"""ClusterKV's budgeted cluster selection in Triton.

Same arguments and result as the torch reference
(:func:`sglang_chelsea.kernels.cluster_select.select_cluster_tokens`): per query head, the
positions of the tokens of its best-scoring clusters, in rank order (score descending,
ties to the lower cluster index; within a cluster, position order), the cluster that
crosses the budget cut to its first positions, ``min(budget, n)`` per row.

Where the work is done:

- torch, once per KV head and independent of the query (:func:`cluster_members`): each
  cluster's size and each token's index among its cluster's tokens (position order). A
  caller whose labels do not change between decode steps computes these once and passes
  them as ``members``.
- Triton, per query head, three kernels:
  ``cluster_score_kernel`` (``q . centroid`` in float32, one program per (query head,
  block of clusters)); ``cluster_offset_kernel`` (each cluster's first output position =
  the total size of the clusters ranked ahead of it, by counting, so no sort: ``O(K^2)``
  comparisons per head in blocks of ``BLOCK_C``); ``cluster_scatter_kernel`` (one
  program per (query head, block of tokens): output position = its cluster's offset + its
  index in the cluster, stored when below the budget, which is the cut).
- The caller (``compression/clusterkv.py``) still maps positions to KV slots with torch
  (``slots[pos]``), as with the reference.

The output equals the reference's wherever no two clusters' scores are within float
rounding of each other without being equal (exact ties are broken the same way).
Triton is imported lazily; on the CPU the kernels run only under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from sglang_chelsea.kernels.cluster_select import cluster_members

__all__ = ["cluster_members", "select_cluster_tokens_triton"]


@functools.lru_cache(maxsize=1)
def _kernels() -> tuple[Any, Any, Any]:
    """Build (once) and return the jitted (score, offset, scatter) kernels."""
    import triton
    import triton.language as tl

    @triton.jit
    def cluster_score_kernel(
        q_ptr,  # [Hq, D]
        c_ptr,  # [Hkv, K, D]
        scores_ptr,  # [Hq, K] float32, written
        K,
        D,
        GROUP,
        BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        h = tl.program_id(0).to(tl.int64)
        kvh = h // GROUP
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_k = cols < K
        dd = tl.arange(0, BLOCK_D)
        d_ok = dd < D
        q = tl.load(q_ptr + h * D + dd, mask=d_ok, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + (kvh * K + cols)[:, None] * D + dd[None, :],
                    mask=in_k[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        tl.store(scores_ptr + h * K + cols, tl.sum(c * q[None, :], axis=1), mask=in_k)

    @triton.jit
    def cluster_offset_kernel(
        scores_ptr,  # [Hq, K] float32
        sizes_ptr,  # [Hkv, K] int64
        offsets_ptr,  # [Hq, K] int64, written
        K,
        GROUP,
        BLOCK_C: tl.constexpr,
    ):
        h = tl.program_id(0).to(tl.int64)
        kvh = h // GROUP
        ci = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_i = ci < K
        si = tl.load(scores_ptr + h * K + ci, mask=in_i, other=float("-inf"))
        off = tl.zeros([BLOCK_C], tl.int64)
        for j0 in range(0, K, BLOCK_C):
            cj = j0 + tl.arange(0, BLOCK_C)
            in_j = cj < K
            sj = tl.load(scores_ptr + h * K + cj, mask=in_j, other=float("-inf"))
            zj = tl.load(sizes_ptr + kvh * K + cj, mask=in_j, other=0)
            # ahead[i, j]: cluster j ranks before cluster i (higher score, or equal and lower).
            ahead = in_j[None, :] & ((sj[None, :] > si[:, None])
                                     | ((sj[None, :] == si[:, None]) & (cj[None, :] < ci[:, None])))
            off += tl.sum(tl.where(ahead, zj[None, :], 0), axis=1)
        tl.store(offsets_ptr + h * K + ci, off, mask=in_i)

    @triton.jit
    def cluster_scatter_kernel(
        labels_ptr,  # [Hkv, n] int64
        within_ptr,  # [Hkv, n] int64
        offsets_ptr,  # [Hq, K] int64
        out_ptr,  # [Hq, take] int64, written
        n,
        K,
        take,
        GROUP,
        BLOCK_N: tl.constexpr,
    ):
        h = tl.program_id(0).to(tl.int64)
        kvh = h // GROUP
        pos = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = pos < n
        lab = tl.load(labels_ptr + kvh * n + pos, mask=in_n, other=0)
        idx = tl.load(within_ptr + kvh * n + pos, mask=in_n, other=0)
        dst = tl.load(offsets_ptr + h * K + lab, mask=in_n, other=0) + idx
        tl.store(out_ptr + h * take + dst, pos.to(tl.int64), mask=in_n & (dst < take))

    return cluster_score_kernel, cluster_offset_kernel, cluster_scatter_kernel


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, x - 1).bit_length()))


def select_cluster_tokens_triton(q: Tensor, centroids: Tensor, labels: Tensor, budget: int,
                                 members: tuple[Tensor, Tensor] | None = None, *,
                                 block_c: int | None = None,
                                 block_n: int | None = None) -> Tensor:
    """Triton version of ``select_cluster_tokens``: same arguments, same result.

    ``members``: ``cluster_members(labels, K)`` when the caller has it already (computed
    here otherwise). ``block_c`` / ``block_n`` (powers of two) override the clusters per
    ranking program and the tokens per scatter program (default: up to 128 / 1024).
    """
    n_q, d = q.shape
    n_kv, n_clusters, _ = centroids.shape
    group = n_q // n_kv
    n = labels.shape[1]
    take = min(budget, n)
    dev = q.device
    out = torch.empty(n_q, max(0, take), dtype=torch.int64, device=dev)
    if take <= 0 or n_q == 0:
        return out
    sizes, within = members if members is not None else cluster_members(labels, n_clusters)
    score, offset, scatter = _kernels()
    bc = block_c or _pow2(n_clusters, 16, 128)
    bn = block_n or _pow2(n, 16, 1024)
    scores = torch.empty(n_q, n_clusters, dtype=torch.float32, device=dev)
    offsets = torch.empty(n_q, n_clusters, dtype=torch.int64, device=dev)
    grid_c = (n_q, -(-n_clusters // bc))
    score[grid_c](q.contiguous(), centroids.contiguous(), scores, n_clusters, d, group,
                  BLOCK_C=bc, BLOCK_D=_pow2(d, 16, 1 << 30))
    offset[grid_c](scores, sizes.contiguous(), offsets, n_clusters, group, BLOCK_C=bc)
    scatter[(n_q, -(-n // bn))](labels.contiguous(), within.contiguous(), offsets, out,
                                n, n_clusters, take, group, BLOCK_N=bn)
    return out
