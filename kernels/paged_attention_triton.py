"""Triton paged attention over the KV pool, with the per-slot, per-KV-head log-size bias.

The pool holds K and V as ``[kv_heads, slots, head_dim]`` per layer and a float32 weight
``[kv_heads, slots]`` (a raw token 1, a Chelsea centroid its cluster size, a padding slot 0).
A request's slots are listed FlashInfer-style: ``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]``.
Each slot's logit gets ``+ log(weight)`` when ``HAS_W`` (weight 0 masks the slot), which is
exactly attention over the expanded cache when every member of a cluster had the centroid's
key and value.

- :func:`decode_attention`: one query token per request; split-K ("flash decoding") over
  the slot list, one program per (request, KV head, split) serving the KV head's whole query
  group, partial results merged by their log-sum-exp.
- :func:`extend_attention`: a prefill chunk; each query block attends to the request's
  cached slots (with the bias) and causally to the chunk's own new keys, in one pass.

Per-query-head lists (``per_head=True``, for the selecting KV policies: ClusterKV, Chelsea
recall): row ``b * q_heads + h`` of ``kv_indptr`` lists what query head ``h`` of request
``b`` attends to (read from its KV head ``h // group``), and ``bias`` (float32, one entry per
``kv_indices`` entry) is added to each entry's logit (``-inf`` drops it); the decode grid is
then one program per (request, query head, split). Both kernels take ``bias`` with shared
lists too. ``k_buffer``/``v_buffer`` may be any ``[kv_heads, slots, D]`` view whose last
dimension is contiguous: a staging buffer of rows shared by all heads is passed as
``rows[None].expand(kv_heads, -1, -1)`` (head stride 0), its row numbers as the indices.
:func:`decode_partials` / :func:`merge_partials` and ``extend_attention(return_lse=True)``
expose the log-sum-exps so that such a second segment (host-tier tokens) merges exactly.

All accumulate in float32 and match :class:`TorchNativeAttnBackend` (the torch reference)
up to float rounding; with float32 inputs the dots run in IEEE precision (no TF32).
Triton is imported lazily, so importing this module works without it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "choose_num_kv_splits",
    "decode_attention",
    "decode_partials",
    "extend_attention",
    "merge_partials",
]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=1)
def _kernels() -> Any:
    """The jitted (decode, extend) kernels; imports triton on first use."""
    from . import paged_attention_kernels as k

    return k.decode_kernel, k.extend_kernel


def choose_num_kv_splits(batch: int, kv_heads: int, max_len: int, num_sms: int) -> int:
    """Splits of each request's slot list: enough programs to fill the GPU about 4 times,
    at least 256 slots per split, a power of two (each value compiles once)."""
    want = _next_pow2(max(1, -(-4 * num_sms // max(1, batch * kv_heads))))
    cap = 1 << (max(1, max_len // 256).bit_length() - 1)  # largest power of two <= the cap
    return min(want, cap, 64)


def decode_partials(q: Tensor, k_buffer: Tensor, v_buffer: Tensor, weights: Tensor | None,
                    kv_indptr: Tensor, kv_indices: Tensor, scaling: float,
                    num_kv_splits: int = 1, block_n: int = 64, bias: Tensor | None = None,
                    per_head: bool = False) -> tuple[Tensor, Tensor]:
    """The split-K partial results of :func:`decode_attention` (same arguments): outputs
    ``[B, q_heads, splits, D]`` and their log-sum-exps ``[B, q_heads, splits]`` (float32;
    ``-inf`` for a split that saw no live entry)."""
    decode_kernel, _ = _kernels()
    bsz, n_q, dim = q.shape
    n_kv = k_buffer.shape[0]
    group = n_q // n_kv
    rows = bsz * n_q if per_head else bsz
    assert kv_indptr.numel() == rows + 1, (kv_indptr.numel(), rows + 1)
    mid_o = torch.empty((bsz, n_q, num_kv_splits, dim), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((bsz, n_q, num_kv_splits), dtype=torch.float32, device=q.device)
    w = weights if weights is not None else k_buffer  # unused pointer when HAS_W is False
    bias_t = bias if bias is not None else mid_lse  # unused pointer when HAS_B is False
    decode_kernel[(bsz, n_q if per_head else n_kv, num_kv_splits)](
        q, k_buffer, v_buffer, w, bias_t, kv_indptr, kv_indices, mid_o, mid_lse,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1), w.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        scaling, group, dim,
        HAS_W=weights is not None, HAS_B=bias is not None, PER_HEAD=per_head,
        BLOCK_G=max(16, _next_pow2(1 if per_head else group)), BLOCK_N=block_n,
        BLOCK_D=max(16, _next_pow2(dim)), NUM_SPLITS=num_kv_splits,
        PREC=_precision(q.dtype))
    return mid_o, mid_lse


def merge_partials(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """Merge attention results over disjoint key sets: ``outs [..., S, D]`` with their
    log-sum-exps ``lses [..., S]`` -> (``[..., D]``, ``[...]``). Parts with lse ``-inf`` get
    weight 0; a row with no live part at all gives zeros and ``-inf``."""
    lse = torch.logsumexp(lses, dim=-1)
    scale = torch.exp(lses - lse.unsqueeze(-1)).nan_to_num_(0.0)  # -inf - -inf: no weight
    return (outs * scale.unsqueeze(-1)).sum(dim=-2), lse


def decode_attention(q: Tensor, k_buffer: Tensor, v_buffer: Tensor, weights: Tensor | None,
                     kv_indptr: Tensor, kv_indices: Tensor, scaling: float,
                     num_kv_splits: int = 1, block_n: int = 64, bias: Tensor | None = None,
                     per_head: bool = False) -> Tensor:
    """Attention of ``q [B, q_heads, D]`` over each request's pool slots -> ``[B, q_heads, D]``.

    ``k_buffer``/``v_buffer``: ``[kv_heads, slots, D]``; ``weights``: ``[kv_heads, slots]``
    float32 or None (all 1); ``kv_indptr`` and ``kv_indices`` int32 on q's device:
    ``[B + 1]`` rows, one per request, or with ``per_head`` ``[B * q_heads + 1]``, one per
    (request, query head). ``bias``: float32 per ``kv_indices`` entry, or None.
    """
    mid_o, mid_lse = decode_partials(q, k_buffer, v_buffer, weights, kv_indptr, kv_indices,
                                     scaling, num_kv_splits, block_n, bias, per_head)
    if num_kv_splits == 1:
        return mid_o[:, :, 0].to(q.dtype)
    return merge_partials(mid_o, mid_lse)[0].to(q.dtype)


def extend_attention(q: Tensor, k_new: Tensor | None, v_new: Tensor | None,
                     k_buffer: Tensor, v_buffer: Tensor, weights: Tensor | None,
                     kv_indptr: Tensor, kv_indices: Tensor, q_start: Tensor, ext_lens: list[int],
                     scaling: float, block_m: int = 64, block_n: int = 64,
                     bias: Tensor | None = None, per_head: bool = False,
                     return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Prefill attention: ``q [T, q_heads, D]`` (requests' new tokens back to back, request
    ``b`` from ``q_start[b]``, ``ext_lens[b]`` tokens) over the request's cached slots
    ``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]`` plus, causally, its own ``k_new``/``v_new``
    ``[T, kv_heads, D]`` (None: the cached slots only). Returns ``[T, q_heads, D]``.

    ``per_head``: the lists are per (request, query head), row ``b * q_heads + h``;
    ``bias``: float32 per ``kv_indices`` entry. ``return_lse``: return the output in float32
    and its log-sum-exps ``[T, q_heads]`` (to merge with another segment)."""
    _, extend_kernel = _kernels()
    n_tok, n_q, dim = q.shape
    n_kv = k_buffer.shape[0]
    assert kv_indptr.numel() == len(ext_lens) * (n_q if per_head else 1) + 1
    blk_req, blk_start = [], []
    for b, n in enumerate(ext_lens):
        for m0 in range(0, n, block_m):
            blk_req.append(b)
            blk_start.append(m0)
    dev = q.device
    blk_req_t = torch.tensor(blk_req, dtype=torch.int32).to(dev, non_blocking=True)
    blk_start_t = torch.tensor(blk_start, dtype=torch.int32).to(dev, non_blocking=True)
    ext_t = torch.tensor(ext_lens, dtype=torch.int32).to(dev, non_blocking=True)
    out = torch.empty_like(q, dtype=torch.float32 if return_lse else q.dtype)
    lse = torch.empty((n_tok, n_q), dtype=torch.float32, device=dev) if return_lse else out
    w = weights if weights is not None else k_buffer  # unused pointers: their flag is off
    bias_t = bias if bias is not None else out
    has_new = k_new is not None and v_new is not None
    k_n = k_new if has_new else q
    v_n = v_new if has_new else q
    extend_kernel[(len(blk_req), n_q)](
        q, k_n, v_n, out, lse, k_buffer, v_buffer, w, bias_t, kv_indptr, kv_indices,
        blk_req_t, blk_start_t, q_start, ext_t,
        q.stride(0), q.stride(1), k_n.stride(0), k_n.stride(1),
        v_n.stride(0), v_n.stride(1), out.stride(0), out.stride(1), lse.stride(0),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        w.stride(0), scaling, n_q // n_kv, dim,
        HAS_W=weights is not None, HAS_B=bias is not None, PER_HEAD=per_head,
        HAS_NEW=has_new, WRITE_LSE=return_lse, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, _next_pow2(dim)), PREC=_precision(q.dtype))
    return (out, lse) if return_lse else out
