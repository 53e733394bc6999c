"""Triton paged decode/extend attention (with the per-slot log-size bias) against the torch
reference, on the CPU through the Triton interpreter (or on a GPU when there is one)."""

from __future__ import annotations

import math

import pytest
import torch
from sglang_chelsea.kernels.merged_attention_ref import attention_with_size_bias
from sglang_chelsea.kernels.paged_attention_triton import (
    choose_num_kv_splits,
    decode_attention,
    extend_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# The Triton interpreter mis-reads bfloat16 tensors (errors of 1e8 on kernels that are exact
# in float16 and float32), so bfloat16 runs where the kernels compile: on a GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _pool(n_kv: int, slots: int, dim: int, dtype: torch.dtype, gen: torch.Generator):
    kb = torch.randn(n_kv, slots, dim, generator=gen).to(DEVICE, dtype)
    vb = torch.randn(n_kv, slots, dim, generator=gen).to(DEVICE, dtype)
    # Cluster sizes 1..6 and some padding slots (weight 0) per KV head.
    w = torch.randint(0, 7, (n_kv, slots), generator=gen).float()
    w[:, :2] = 1.0  # every request below sees at least one live slot per head
    return kb, vb, w.to(DEVICE)


def _slot_lists(lengths: list[int], slots: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Distinct, non-contiguous slots per request; each list starts with slot 0 or 1."""
    out = []
    for n in lengths:
        perm = torch.randperm(slots - 2, generator=gen)[: n - 1] + 2
        out.append(torch.cat([torch.tensor([len(out) % 2]), perm]))
    return out


def _indptr(lists: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    indptr = torch.zeros(len(lists) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(torch.tensor([len(x) for x in lists]), 0)
    return indptr.to(DEVICE), torch.cat(lists).to(torch.int32).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("weighted", [True, False])
def test_decode_matches_reference(dtype: torch.dtype, splits: int, weighted: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    n_q, n_kv, dim, slots = 4, 2, 32, 300
    kb, vb, w = _pool(n_kv, slots, dim, dtype, gen)
    lists = _slot_lists([5, 130, 77], slots, gen)
    q = torch.randn(len(lists), n_q, dim, generator=gen).to(DEVICE, dtype)
    indptr, indices = _indptr(lists)
    scaling = 1 / math.sqrt(dim)
    out = decode_attention(q, kb, vb, w if weighted else None, indptr, indices, scaling,
                           num_kv_splits=splits, block_n=32)
    for b, sl in enumerate(lists):
        sl = sl.to(DEVICE)
        sizes = w[:, sl] if weighted else torch.ones(n_kv, len(sl), device=DEVICE)
        ref = attention_with_size_bias(q[b][:, None], kb[:, sl], vb[:, sl], sizes)[:, 0]
        assert out[b].shape == ref.shape
        err = (out[b].float() - ref.float()).abs().max().item()
        assert err < TOL[dtype], (b, err)


@pytest.mark.parametrize("dtype", DTYPES)
def test_extend_matches_reference(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    n_q, n_kv, dim, slots = 4, 2, 16, 200
    kb, vb, w = _pool(n_kv, slots, dim, dtype, gen)
    prefix = [0, 40, 3]
    ext = [37, 5, 70]  # 70 > BLOCK_M: two query blocks, the second partly empty
    lists = [(_slot_lists([n], slots, gen)[0] if n else torch.zeros(0, dtype=torch.int64))
             for n in prefix]
    indptr, indices = _indptr(lists)
    total = sum(ext)
    q = torch.randn(total, n_q, dim, generator=gen).to(DEVICE, dtype)
    k_new = torch.randn(total, n_kv, dim, generator=gen).to(DEVICE, dtype)
    v_new = torch.randn(total, n_kv, dim, generator=gen).to(DEVICE, dtype)
    q_start = torch.tensor([0, ext[0], ext[0] + ext[1]], dtype=torch.int32, device=DEVICE)
    out = extend_attention(q, k_new, v_new, kb, vb, w, indptr, indices, q_start, ext,
                           1 / math.sqrt(dim), block_m=64, block_n=32)
    start = 0
    for b, sl in enumerate(lists):
        sl = sl.to(DEVICE)
        n = ext[b]
        keys = torch.cat([kb[:, sl], k_new[start:start + n].transpose(0, 1)], dim=1)
        values = torch.cat([vb[:, sl], v_new[start:start + n].transpose(0, 1)], dim=1)
        sizes = torch.cat([w[:, sl], torch.ones(n_kv, n, device=DEVICE)], dim=1)
        ref = attention_with_size_bias(q[start:start + n].transpose(0, 1), keys, values, sizes,
                                       causal_offset=len(sl)).transpose(0, 1)
        err = (out[start:start + n].float() - ref.float()).abs().max().item()
        assert err < TOL[dtype], (b, err)
        start += n


def test_num_kv_splits_fills_the_gpu_and_respects_short_sequences() -> None:
    assert choose_num_kv_splits(1, 8, 32768, 132) == 64
    assert choose_num_kv_splits(16, 8, 32768, 132) == 8
    assert choose_num_kv_splits(1, 8, 300, 132) == 1  # < 2 * 256 slots: no split
    assert choose_num_kv_splits(64, 8, 32768, 132) == 2
