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
    decode_partials,
    extend_attention,
    merge_partials,
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


# ---------------------------------------------------------------- per-query-head slot lists
def _head_lists(n_req: int, n_q: int, slots: int, lengths: list[int], gen: torch.Generator
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per (request, query head) row: random slots (repeats allowed) and a bias with some
    ``-inf`` entries; ``lengths`` cycles over the rows (0: an empty list)."""
    idx, bias = [], []
    for row in range(n_req * n_q):
        n = lengths[row % len(lengths)]
        idx.append(torch.randint(0, slots, (n,), generator=gen))
        b = torch.randn(n, generator=gen)
        b[torch.rand(n, generator=gen) < 0.2] = float("-inf")
        if n > 1:
            b[0] = 0.5  # at least one live entry in a non-trivial row
        bias.append(b)
    return idx, bias


def _head_reference(q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, sl: torch.Tensor,
                    bias: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One query ``q [T, D]`` row over slots ``sl`` of ``kb``/``vb [slots, D]`` with the bias:
    output (zeros when nothing is live) and log-sum-exp, in float32."""
    logits = (q.float() @ kb[sl].float().T) * scaling + bias.to(q.device)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs @ vb[sl].float(), lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_q,n_kv,splits", [(2, 2, 1), (4, 2, 3), (6, 2, 2)])
def test_per_head_decode_matches_reference(dtype: torch.dtype, n_q: int, n_kv: int,
                                           splits: int) -> None:
    gen = torch.Generator().manual_seed(2)
    dim, slots, n_req = 16, 120, 3
    kb, vb, _ = _pool(n_kv, slots, dim, dtype, gen)
    # Empty, single-entry, short and longer-than-a-block lists, mixed per head.
    idx, bias = _head_lists(n_req, n_q, slots, [0, 1, 3, 70, 40], gen)
    indptr, indices = _indptr(idx)
    bias_t = torch.cat(bias).to(DEVICE)
    q = torch.randn(n_req, n_q, dim, generator=gen).to(DEVICE, dtype)
    scaling = 1 / math.sqrt(dim)
    out = decode_attention(q, kb, vb, None, indptr, indices, scaling, num_kv_splits=splits,
                           block_n=32, bias=bias_t, per_head=True)
    mid_o, mid_lse = decode_partials(q, kb, vb, None, indptr, indices, scaling, splits, 32,
                                     bias_t, per_head=True)
    _, lse = merge_partials(mid_o, mid_lse)
    group = n_q // n_kv
    for b in range(n_req):
        for h in range(n_q):
            row = b * n_q + h
            sl = idx[row].to(DEVICE)
            ref, ref_lse = _head_reference(q[b, h][None], kb[h // group], vb[h // group], sl,
                                           bias[row], scaling)
            err = (out[b, h].float() - ref[0]).abs().max().item()
            assert err < TOL[dtype], (b, h, len(sl), err)
            if torch.isinf(ref_lse).all():  # nothing live: zeros, lse -inf
                assert torch.isneginf(lse[b, h]) and not out[b, h].abs().any()
            else:
                assert abs(lse[b, h].item() - ref_lse.item()) < 10 * TOL[dtype]


def test_per_head_decode_with_pool_weights_and_a_staged_segment() -> None:
    """Pool weights (HAS_W) per head, and a second segment read from a staging buffer of
    rows shared by all heads (head stride 0), merged by log-sum-exp: equals one softmax
    over both segments."""
    gen = torch.Generator().manual_seed(3)
    n_q, n_kv, dim, slots, n_req = 4, 2, 16, 90, 2
    kb, vb, w = _pool(n_kv, slots, dim, torch.float32, gen)
    idx, _ = _head_lists(n_req, n_q, slots, [5, 33, 1, 12], gen)
    indptr, indices = _indptr(idx)
    staged_k = torch.randn(n_req * n_q * 3, dim, generator=gen).to(DEVICE)
    staged_v = torch.randn(n_req * n_q * 3, dim, generator=gen).to(DEVICE)
    sbias = torch.zeros(n_req * n_q * 3)
    sbias[1::3] = float("-inf")
    s_indptr = torch.arange(0, n_req * n_q * 3 + 1, 3, dtype=torch.int32, device=DEVICE)
    s_indices = torch.arange(n_req * n_q * 3, dtype=torch.int32, device=DEVICE)
    q = torch.randn(n_req, n_q, dim, generator=gen).to(DEVICE)
    scaling = 0.3
    o1, l1 = decode_partials(q, kb, vb, w, indptr, indices, scaling, 2, 16, per_head=True)
    o2, l2 = decode_partials(q, staged_k[None].expand(n_kv, -1, -1),
                             staged_v[None].expand(n_kv, -1, -1), None, s_indptr, s_indices,
                             scaling, 1, 16, sbias.to(DEVICE), per_head=True)
    out, _ = merge_partials(torch.cat([o1, o2], 2), torch.cat([l1, l2], 2))
    for b in range(n_req):
        for h in range(n_q):
            row = b * n_q + h
            sl = idx[row].to(DEVICE)
            kvh = h // (n_q // n_kv)
            keys = torch.cat([kb[kvh, sl], staged_k[3 * row:3 * row + 3]])
            values = torch.cat([vb[kvh, sl], staged_v[3 * row:3 * row + 3]])
            bias = torch.cat([torch.log(w[kvh, sl]).cpu(), sbias[3 * row:3 * row + 3]])
            ref, _ = _head_reference(q[b, h][None], keys, values,
                                     torch.arange(len(keys), device=DEVICE), bias, scaling)
            assert (out[b, h] - ref[0]).abs().max().item() < 1e-4, (b, h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_head_extend_matches_reference(dtype: torch.dtype) -> None:
    """Per-head cached lists with a bias, the chunk's own keys causally, and the
    log-sum-exp; and the cached part alone (no new keys)."""
    gen = torch.Generator().manual_seed(4)
    n_q, n_kv, dim, slots = 4, 2, 16, 100
    kb, vb, _ = _pool(n_kv, slots, dim, dtype, gen)
    ext = [9, 20]
    idx, bias = _head_lists(len(ext), n_q, slots, [0, 7, 40, 2, 1, 0, 25, 3], gen)
    indptr, indices = _indptr(idx)
    bias_t = torch.cat(bias).to(DEVICE)
    total = sum(ext)
    q = torch.randn(total, n_q, dim, generator=gen).to(DEVICE, dtype)
    k_new = torch.randn(total, n_kv, dim, generator=gen).to(DEVICE, dtype)
    v_new = torch.randn(total, n_kv, dim, generator=gen).to(DEVICE, dtype)
    q_start = torch.tensor([0, ext[0]], dtype=torch.int32, device=DEVICE)
    scaling = 1 / math.sqrt(dim)
    out, lse = extend_attention(q, k_new, v_new, kb, vb, None, indptr, indices, q_start, ext,
                                scaling, block_m=16, block_n=16, bias=bias_t, per_head=True,
                                return_lse=True)
    cached, c_lse = extend_attention(q, None, None, kb, vb, None, indptr, indices, q_start,
                                     ext, scaling, block_m=16, block_n=16, bias=bias_t,
                                     per_head=True, return_lse=True)
    assert out.dtype == torch.float32
    start = 0
    for b, n in enumerate(ext):
        for h in range(n_q):
            row = b * n_q + h
            kvh = h // (n_q // n_kv)
            sl = idx[row].to(DEVICE)
            qs = q[start:start + n, h]
            ref_c, ref_cl = _head_reference(qs, kb[kvh], vb[kvh], sl, bias[row], scaling)
            assert (cached[start:start + n, h] - ref_c).abs().max().item() < TOL[dtype]
            live = ~torch.isinf(ref_cl)
            assert torch.equal(torch.isneginf(c_lse[start:start + n, h]), ~live)
            assert torch.allclose(c_lse[start:start + n, h][live], ref_cl[live],
                                  atol=10 * TOL[dtype])
            keys = torch.cat([kb[kvh, sl], k_new[start:start + n, kvh]])
            values = torch.cat([vb[kvh, sl], v_new[start:start + n, kvh]])
            logits = (qs.float() @ keys.float().T) * scaling
            logits[:, :len(sl)] += bias[row].to(DEVICE)
            causal = torch.arange(n, device=DEVICE)[None] > torch.arange(n, device=DEVICE)[:, None]
            logits[:, len(sl):] = logits[:, len(sl):].masked_fill(causal, float("-inf"))
            ref = torch.softmax(logits, -1) @ values.float()
            assert (out[start:start + n, h] - ref).abs().max().item() < TOL[dtype], (b, h)
            assert torch.allclose(lse[start:start + n, h], torch.logsumexp(logits, -1),
                                  atol=10 * TOL[dtype])
        start += n
