"""ClusterKV's batched cosine k-means in Triton: an assignment kernel and an update kernel.

Same arguments, rules and result as the torch reference
(:func:`sglang_chelsea.kernels.kmeans.cosine_kmeans`): the same deterministic start
(``k`` keys evenly spaced along the sequence, taken by the torch helper the reference
uses), then ``max(1, iters)`` rounds of

- ``kmeans_assign_kernel``, one program per (batch row, block of ``BLOCK_N`` points): each
  point's label is the argmax of its cosine with the unit centroids (float32 ``tl.dot`` in
  IEEE precision over blocks of ``BLOCK_K`` centroids; ties go to the lowest centroid
  index, as ``torch.argmax``);
- ``kmeans_update_kernel``, one program per (batch row, block of ``BLOCK_K`` centroids):
  centroid = mean of the raw (not normalised) keys of its members, summed as one-hot
  products over blocks of ``BLOCK_N`` points (no atomics, so the result is
  deterministic); an empty cluster keeps its previous centroid and gets size 0.

The labels equal the reference's wherever no point has two centroids within float
rounding of each other; the centroids then agree within float32 rounding (the sums are
accumulated in another order).

Triton is imported lazily: importing this module works without triton installed. On the
CPU the kernels run only under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from .kmeans import NORM_EPS, KMeansResult, check_kmeans_args, initial_centroids

__all__ = ["cosine_kmeans_triton"]


@functools.lru_cache(maxsize=1)
def _kernels() -> tuple[Any, Any]:
    """Build (once) and return the jitted (assign, update) kernels; imports triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def kmeans_assign_kernel(
        x_ptr,  # [B, n, D] keys, any float dtype
        c_ptr,  # [B, k, D] float32 centroids (raw means; normalised here)
        labels_ptr,  # [B, n] int64, written
        n,
        k,
        D,
        norm_eps,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = rows < n
        dd = tl.arange(0, BLOCK_D)
        d_ok = dd < D
        x = tl.load(x_ptr + (b * n + rows)[:, None] * D + dd[None, :],
                    mask=in_n[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        xn = x / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), norm_eps)[:, None]
        best = tl.full([BLOCK_N], float("-inf"), tl.float32)
        best_idx = tl.zeros([BLOCK_N], tl.int64)
        for k0 in range(0, k, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            in_k = cols < k
            c = tl.load(c_ptr + (b * k + cols)[:, None] * D + dd[None, :],
                        mask=in_k[:, None] & d_ok[None, :], other=0.0)
            cn = c / tl.maximum(tl.sqrt(tl.sum(c * c, axis=1)), norm_eps)[:, None]
            sim = tl.dot(xn, tl.trans(cn), input_precision="ieee")  # [BLOCK_N, BLOCK_K]
            sim = tl.where(in_k[None, :], sim, float("-inf"))
            blk_best, blk_idx = tl.max(sim, axis=1, return_indices=True,
                                       return_indices_tie_break_left=True)
            # Strictly greater: on a tie across blocks the earlier (lower) index stays.
            better = blk_best > best
            best = tl.where(better, blk_best, best)
            best_idx = tl.where(better, k0 + blk_idx.to(tl.int64), best_idx)
        tl.store(labels_ptr + b * n + rows, best_idx, mask=in_n)

    @triton.jit
    def kmeans_update_kernel(
        x_ptr,  # [B, n, D] keys
        labels_ptr,  # [B, n] int64
        c_ptr,  # [B, k, D] float32 centroids, updated in place
        sizes_ptr,  # [B, k] int64, written
        n,
        k,
        D,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        in_k = cols < k
        dd = tl.arange(0, BLOCK_D)
        d_ok = dd < D
        sums = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
        counts = tl.zeros([BLOCK_K], tl.float32)
        for n0 in range(0, n, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            in_n = rows < n
            lab = tl.load(labels_ptr + b * n + rows, mask=in_n, other=-1)
            x = tl.load(x_ptr + (b * n + rows)[:, None] * D + dd[None, :],
                        mask=in_n[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            onehot = (cols[:, None] == lab[None, :]).to(tl.float32)  # [BLOCK_K, BLOCK_N]
            sums += tl.dot(onehot, x, input_precision="ieee")
            counts += tl.sum(onehot, axis=1)
        c_off = (b * k + cols)[:, None] * D + dd[None, :]
        c_mask = in_k[:, None] & d_ok[None, :]
        prev = tl.load(c_ptr + c_off, mask=c_mask, other=0.0)
        mean = sums / tl.maximum(counts, 1.0)[:, None]
        tl.store(c_ptr + c_off, tl.where((counts > 0)[:, None], mean, prev), mask=c_mask)
        tl.store(sizes_ptr + b * k + cols, counts.to(tl.int64), mask=in_k)

    return kmeans_assign_kernel, kmeans_update_kernel


def _block(x: int, cap: int) -> int:
    """Power-of-two block covering ``x`` (at most ``cap``), at least 16 (``tl.dot``)."""
    return max(16, min(cap, 1 << max(0, x - 1).bit_length()))


def cosine_kmeans_triton(keys: Tensor, k: int, iters: int = 10, *,
                         block_n: int | None = None,
                         block_k: int | None = None) -> KMeansResult:
    """Triton version of ``cosine_kmeans``: same arguments, same result.

    ``block_n`` / ``block_k`` (powers of two, >= 16) override the points per assignment
    program and the centroids per update program (default: up to 64 each).
    """
    check_kmeans_args(keys, k)
    b, n, d = keys.shape
    dev = keys.device
    x = keys.contiguous()
    centroids = initial_centroids(x, k).float().contiguous()
    labels = torch.zeros(b, n, dtype=torch.int64, device=dev)
    sizes = torch.zeros(b, k, dtype=torch.int64, device=dev)
    if b == 0:
        return KMeansResult(centroids=centroids, labels=labels, sizes=sizes)
    assign, update = _kernels()
    bn = block_n or _block(n, 64)
    bk = block_k or _block(k, 64)
    bd = _block(d, 1 << 30)
    grid_assign = (b, -(-n // bn))
    grid_update = (b, -(-k // bk))
    for _ in range(max(1, iters)):
        assign[grid_assign](x, centroids, labels, n, k, d, NORM_EPS,
                            BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd)
        update[grid_update](x, labels, centroids, sizes, n, k, d,
                            BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd)
    return KMeansResult(centroids=centroids, labels=labels, sizes=sizes)
