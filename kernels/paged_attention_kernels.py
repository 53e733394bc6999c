"""The Triton kernels behind :mod:`paged_attention_triton` (imported only when first used,
so the package imports without triton). See that module for what they compute."""

import triton
import triton.language as tl


@triton.jit
def _attend_slots(acc, m_i, l_i, q, k_ptr, v_ptr, w_ptr, b_ptr, kv_indices, lo, hi, kvh,
                  stride_kh, stride_ks, stride_vh, stride_vs, stride_wh, scaling, D,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """Online-softmax accumulation of ``q`` over pool slots ``kv_indices[lo:hi]``; with
    ``HAS_W`` each slot's logit gets ``log(w[kvh, slot])``, with ``HAS_B`` the list entry's
    own bias ``b[position]`` (``-inf`` drops the entry)."""
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        nmask = offs < hi
        slot = tl.load(kv_indices + offs, mask=nmask, other=0).to(tl.int64)
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + kvh * stride_kh + slot[:, None] * stride_ks + d[None, :],
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scaling
        if HAS_W:
            w = tl.load(w_ptr + kvh * stride_wh + slot, mask=nmask, other=1.0)
            s += tl.log(w)[None, :]
        if HAS_B:
            s += tl.load(b_ptr + offs, mask=nmask, other=0.0)[None, :]
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kvh * stride_vh + slot[:, None] * stride_vs + d[None, :],
                    mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i

@triton.jit
def decode_kernel(q_ptr, k_ptr, v_ptr, w_ptr, b_ptr, kv_indptr, kv_indices, mid_o, mid_lse,
                  stride_qb, stride_qh, stride_kh, stride_ks, stride_vh, stride_vs,
                  stride_wh, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                  scaling, GROUP, D,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, PER_HEAD: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, PREC: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    if PER_HEAD:  # h: a query head with its own list (row b * q_heads + h)
        row = b * tl.num_programs(1) + h
        kvh = h // GROUP
        qh0 = h
        n_rows = 1
    else:  # h: a KV head; its whole query group shares the request's list (row b)
        row = b
        kvh = h
        qh0 = h * GROUP
        n_rows = GROUP
    start = tl.load(kv_indptr + row)
    end = tl.load(kv_indptr + row + 1)
    per_split = tl.cdiv(end - start, NUM_SPLITS)
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, end)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask = g < n_rows
    qh = qh0 + g
    q_mask = gmask[:, None] & (d < D)[None, :]
    q = tl.load(q_ptr + b * stride_qb + qh[:, None] * stride_qh + d[None, :], mask=q_mask,
                other=0.0)
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    acc, m_i, l_i = _attend_slots(acc, m_i, l_i, q, k_ptr, v_ptr, w_ptr, b_ptr, kv_indices,
                                  lo, hi, kvh, stride_kh, stride_ks, stride_vh, stride_vs,
                                  stride_wh, scaling, D, HAS_W, HAS_B, BLOCK_N, BLOCK_D, PREC)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(mid_o + b * stride_ob + qh[:, None] * stride_oh + split * stride_os + d[None, :],
             out, mask=q_mask)
    tl.store(mid_lse + b * stride_lb + qh * stride_lh + split, lse, mask=gmask)

@triton.jit
def extend_kernel(q_ptr, k_new_ptr, v_new_ptr, o_ptr, lse_ptr, k_ptr, v_ptr, w_ptr, b_ptr,
                  kv_indptr, kv_indices, blk_req, blk_start, q_start, ext_len,
                  stride_qt, stride_qh, stride_knt, stride_knh, stride_vnt, stride_vnh,
                  stride_ot, stride_oh, stride_lt, stride_kh, stride_ks, stride_vh, stride_vs,
                  stride_wh, scaling, GROUP, D,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, PER_HEAD: tl.constexpr,
                  HAS_NEW: tl.constexpr, WRITE_LSE: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    blk = tl.program_id(0)
    qh = tl.program_id(1)
    kvh = qh // GROUP
    r = tl.load(blk_req + blk)
    if PER_HEAD:  # each query head has its own list of the request's cached slots
        row = r * tl.num_programs(1) + qh
    else:
        row = r
    m0 = tl.load(blk_start + blk)
    qs = tl.load(q_start + r).to(tl.int64)
    el = tl.load(ext_len + r)
    m = m0 + tl.arange(0, BLOCK_M)
    mmask = m < el
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q_mask = mmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + (qs + m)[:, None] * stride_qt + qh * stride_qh + d[None, :],
                mask=q_mask, other=0.0)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # The cached prefix (pool slots, with the size bias).
    acc, m_i, l_i = _attend_slots(acc, m_i, l_i, q, k_ptr, v_ptr, w_ptr, b_ptr, kv_indices,
                                  tl.load(kv_indptr + row), tl.load(kv_indptr + row + 1), kvh,
                                  stride_kh, stride_ks, stride_vh, stride_vs, stride_wh,
                                  scaling, D, HAS_W, HAS_B, BLOCK_N, BLOCK_D, PREC)
    if HAS_NEW:  # the chunk's own keys, causally
        hi = tl.minimum(el, m0 + BLOCK_M)
        for n0 in range(0, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < el
            kv_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(k_new_ptr + (qs + n)[:, None] * stride_knt + kvh * stride_knh
                        + d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scaling
            s = tl.where(nmask[None, :] & (n[None, :] <= m[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_new_ptr + (qs + n)[:, None] * stride_vnt + kvh * stride_vnh
                        + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(o_ptr + (qs + m)[:, None] * stride_ot + qh * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=q_mask)
    if WRITE_LSE:
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + (qs + m) * stride_lt + qh, lse, mask=mmask)
