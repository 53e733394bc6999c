"""Chelsea's Chunked Soft Matching as one Triton kernel.

One program per (chunk, head) holds the whole chunk (``BLOCK = next_pow2(C)`` rows) in
registers and runs every merge round inside the kernel. The rules, tie-breaking and
float32 arithmetic are those of the torch reference
(:func:`sglang_chelsea.kernels.chunked_soft_matching.chunked_soft_matching`), so both
return the same assignment and the same centroids up to float rounding.

Inside the kernel, gathers and scatters over the chunk are written as ``BLOCK x BLOCK``
one-hot products (the merge is ``onehot @ moved_rows`` with IEEE fp32 ``tl.dot``), which
keeps everything in registers; the cost per round is ``O(C^2 * D)``.

Triton is imported lazily: importing this module works without triton installed.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from .chunked_soft_matching import NORM_EPS, MergeResult, check_merge_args, round_quota_table

__all__ = ["chunked_soft_matching_triton"]


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    """Build (once) and return the jitted kernel; imports triton on first use."""
    import triton
    import triton.language as tl

    @triton.jit
    def chunked_soft_matching_kernel(
        k_ptr,
        v_ptr,
        size_ptr,
        prot_ptr,
        quota_ptr,
        target_ptr,
        out_k_ptr,
        out_v_ptr,
        out_size_ptr,
        kept_ptr,
        assign_ptr,
        H,
        C,
        D,
        DV,
        min_similarity,
        max_rounds,
        norm_eps,
        HAS_SIZES: tl.constexpr,
        HAS_PROT: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)  # = n * H + h
        n = pid // H
        rows = tl.arange(0, BLOCK)
        in_chunk = rows < C
        dk = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        row_off = pid * C + rows
        k_mask = in_chunk[:, None] & (dk < D)[None, :]
        v_mask = in_chunk[:, None] & (dv < DV)[None, :]
        keys = tl.load(k_ptr + row_off[:, None] * D + dk[None, :], mask=k_mask, other=0.0)
        vals = tl.load(v_ptr + row_off[:, None] * DV + dv[None, :], mask=v_mask, other=0.0)
        if HAS_SIZES:
            size = tl.load(size_ptr + row_off, mask=in_chunk, other=0.0).to(tl.float32)
        else:
            size = tl.where(in_chunk, 1.0, 0.0)
        if HAS_PROT:
            prot = tl.load(prot_ptr + n * C + rows, mask=in_chunk, other=0) != 0
        else:
            prot = rows < 0
        # Weighted sums: centroid = sum / size; cosine only needs the direction of ksum.
        ksum = keys.to(tl.float32) * size[:, None]
        vsum = vals.to(tl.float32) * size[:, None]
        alive = in_chunk
        root = rows  # current surviving slot of each input token
        neg_inf = float("-inf")

        target = tl.load(target_ptr + n)
        count = C
        rounds = 0
        progress = 1
        while (progress > 0) & (rounds < max_rounds):
            eligible = alive & (prot == 0)
            parity = (tl.cumsum(eligible.to(tl.int32), axis=0) - 1) % 2
            is_a = eligible & (parity == 0)
            is_b = eligible & (parity == 1)

            norm = tl.sqrt(tl.sum(ksum * ksum, axis=1))
            kn = ksum / tl.maximum(norm, norm_eps)[:, None]
            sim = tl.dot(kn, tl.trans(kn), input_precision="ieee")
            sim = tl.where(is_b[None, :], sim, neg_inf)
            best, partner = tl.max(
                sim, axis=1, return_indices=True, return_indices_tie_break_left=True
            )

            quota = tl.minimum(tl.load(quota_ptr + count), tl.maximum(count - target, 0))
            candidate = is_a & (best > neg_inf) & (best >= min_similarity)
            score = tl.where(candidate, best, neg_inf)
            # rank[a] = number of candidates ahead of a: higher score, or equal and lower.
            ahead = candidate[None, :] & (
                (score[None, :] > score[:, None])
                | ((score[None, :] == score[:, None]) & (rows[None, :] < rows[:, None]))
            )
            rank = tl.sum(ahead.to(tl.int32), axis=1)
            selected = candidate & (rank < quota)
            progress = tl.sum(selected.to(tl.int32), axis=0)
            count -= progress

            # joins[b, a] = 1 where the selected A token a merges into b.
            joins = (selected[None, :] & (partner[None, :] == rows[:, None])).to(tl.float32)
            ksum = tl.where(selected[:, None], 0.0, ksum) + tl.dot(
                joins, tl.where(selected[:, None], ksum, 0.0), input_precision="ieee"
            )
            vsum = tl.where(selected[:, None], 0.0, vsum) + tl.dot(
                joins, tl.where(selected[:, None], vsum, 0.0), input_precision="ieee"
            )
            size = tl.where(selected, 0.0, size) + tl.sum(
                joins * tl.where(selected, size, 0.0)[None, :], axis=1
            )
            alive = alive & (selected == 0)
            root = tl.gather(tl.where(selected, partner, rows), root, axis=0)
            rounds += 1

        slot = tl.cumsum(alive.to(tl.int32), axis=0) - 1
        tl.store(kept_ptr + pid, count)
        tl.store(assign_ptr + row_off, tl.gather(slot, root, axis=0).to(tl.int64), mask=in_chunk)

        denom = tl.where(alive, size, 1.0)[:, None]
        out_row = pid * C + slot
        tl.store(
            out_k_ptr + out_row[:, None] * D + dk[None, :],
            (ksum / denom).to(out_k_ptr.dtype.element_ty),
            mask=alive[:, None] & (dk < D)[None, :],
        )
        tl.store(
            out_v_ptr + out_row[:, None] * DV + dv[None, :],
            (vsum / denom).to(out_v_ptr.dtype.element_ty),
            mask=alive[:, None] & (dv < DV)[None, :],
        )
        tl.store(out_size_ptr + out_row, size, mask=alive)

    return chunked_soft_matching_kernel


def _block(x: int) -> int:
    """Power-of-two block of at least 16 (``tl.dot`` needs every dimension >= 16)."""
    return max(16, 1 << max(0, x - 1).bit_length())


def chunked_soft_matching_triton(
    keys: Tensor,
    values: Tensor,
    sizes: Tensor | None = None,
    *,
    target: int | Tensor,
    round_fraction: float,
    min_similarity: float,
    protected: Tensor | None = None,
    max_rounds: int | None = None,
) -> MergeResult:
    """Triton version of ``chunked_soft_matching``: same arguments, same result.

    One program per (chunk, head); the chunk is held whole in registers, so this is
    meant for chunk sizes up to a few hundred tokens (``BLOCK = next_pow2(C)``).
    On CPU it runs only under ``TRITON_INTERPRET=1`` (set before triton is imported).
    """
    check_merge_args(keys, values, sizes, target, protected)
    kernel = _kernel()
    n, h, c, d = keys.shape
    dv = values.shape[-1]
    dev = keys.device
    keys_c = keys.contiguous()
    values_c = values.contiguous()
    quota = torch.tensor(round_quota_table(c, round_fraction), device=dev, dtype=torch.int32)
    # Absent sizes / protected: any tensor stands in for the pointer the kernel never reads.
    sizes_c = sizes.to(torch.float32).contiguous() if sizes is not None else quota
    prot_c = protected.to(torch.int8).contiguous() if protected is not None else quota
    targets = (target.to(device=dev, dtype=torch.int32).contiguous()
               if isinstance(target, Tensor)
               else torch.full((n,), target, device=dev, dtype=torch.int32))

    out_k = torch.zeros(n, h, c, d, device=dev, dtype=keys.dtype)
    out_v = torch.zeros(n, h, c, dv, device=dev, dtype=values.dtype)
    out_size = torch.zeros(n, h, c, device=dev, dtype=torch.float32)
    kept = torch.zeros(n, h, device=dev, dtype=torch.int32)
    assignment = torch.empty(n, h, c, device=dev, dtype=torch.int64)
    block = _block(c)
    kernel[(n * h,)](
        keys_c,
        values_c,
        sizes_c,
        prot_c,
        quota,
        targets,
        out_k,
        out_v,
        out_size,
        kept,
        assignment,
        h,
        c,
        d,
        dv,
        float(min_similarity),
        c if max_rounds is None else max_rounds,
        NORM_EPS,
        HAS_SIZES=sizes is not None,
        HAS_PROT=protected is not None,
        BLOCK=block,
        BLOCK_D=_block(d),
        BLOCK_DV=_block(dv),
        num_warps=8 if block >= 128 else 4,
    )
    m = int(kept.max())
    return MergeResult(
        keys=out_k[:, :, :m].contiguous(),
        values=out_v[:, :, :m].contiguous(),
        sizes=out_size[:, :, :m].contiguous(),
        num_kept=kept.to(torch.int64),
        assignment=assignment,
    )
