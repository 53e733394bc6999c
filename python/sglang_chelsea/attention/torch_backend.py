"""The CPU attention backend: torch's fused CPU flash attention over the KV pool.

Per request, the cached slots are read as a view of the pool when they form one run of
slots (the usual case without compression) and gathered otherwise. The per-slot, per-KV-head
weight enters as an additive ``log(weight)`` logit bias (weight 0 masks a slot).

GQA without copying cached K/V: for attention over cached slots (no causal mask), the
query heads of one KV head's group are stacked as extra query rows. Extend attends the new
tokens to the cached slots (with weights) and causally to each other, in two fused calls
whose results are merged by their log-sum-exp, as SGLang's paged + ragged split does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from sglang_chelsea.attention.base_backend import AttentionBackend
from sglang_chelsea.compression.base import Selection
from sglang_chelsea.mem_cache.memory_pool import MHATokenToKVPool, head_rows
from sglang_chelsea.model_executor.forward_batch_info import ForwardBatch

if TYPE_CHECKING:
    from sglang_chelsea.mem_cache.host_pool import HostKVPool

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                    causal: bool = False, mask: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention on ``[1, heads, len, dim]`` tensors; returns (output, log-sum-exp).

    On a GPU this is the float32 math reference (the backend is there to check the Triton
    kernels, not to be fast)."""
    if q.device.type == "cpu":
        out, lse = _flash(q, k, v, 0.0, causal, attn_mask=mask, scale=scaling)
        return out, lse
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scaling)
    if mask is not None:
        scores = scores + mask.float()
    if causal:
        upper = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu_(1)
        scores = scores.masked_fill(upper, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.float())
    return out.to(q.dtype), lse


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: Optional[torch.Tensor], scaling: float) -> torch.Tensor:
    """Reference: softmax(q k^T * scaling + mask) v with explicit matmuls."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scaling)
    if mask is not None:
        scores = scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def merge_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets (``o [T, H, D]``, ``lse [T, H]``)."""
    lse = torch.logaddexp(lse1, lse2)
    return (o1 * torch.exp(lse1 - lse).unsqueeze(-1) + o2 * torch.exp(lse2 - lse).unsqueeze(-1),
            lse)


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      mask: Optional[torch.Tensor], scaling: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA attention of ``q [T, q_heads, D]`` over per-KV-head ``keys``/``values``
    ``[1, kv_heads, n, D]`` without copying them per query head: each KV head's query heads
    (for all T tokens) are rows of one call. ``mask``: ``[1, kv_heads, 1, n]`` (per slot) or
    ``[kv_heads, group, n]`` (per query head). Returns ``o [T, q_heads, D]``, ``lse [T, q_heads]``."""
    t, n_q, dim = q.shape
    n_kv = keys.shape[1]
    group = n_q // n_kv
    rows = q.view(t, n_kv, group, dim).transpose(0, 1).reshape(1, n_kv, t * group, dim)
    if mask is not None and mask.dim() == 3:
        mask = mask[:, None].expand(n_kv, t, group, mask.shape[-1]).reshape(1, n_kv, t * group, -1)
    o, lse = flash_attention(rows, keys, values, scaling, mask=mask)
    return (o.view(n_kv, t, group, dim).transpose(0, 1).reshape(t, n_q, dim),
            lse.view(n_kv, t, group).transpose(0, 1).reshape(t, n_q))


def _gather_head_rows(pool: MHATokenToKVPool, layer_id: int, heads: torch.Tensor,
                      slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K and V ``[rows, n, dim]`` of ``slots [rows, n]``, row ``r`` read from KV head
    ``heads[r]``, by one ``index_select`` each; and the flat row numbers used."""
    rows_n, n = slots.shape
    dim = pool.head_dim
    rows = head_rows(heads, slots, pool.size + 1)
    keys = pool.k_buffer[layer_id].view(-1, dim).index_select(0, rows).view(rows_n, n, dim)
    values = pool.v_buffer[layer_id].view(-1, dim).index_select(0, rows).view(rows_n, n, dim)
    return keys, values, rows


@dataclass
class SlotRun:
    """A request's cached slots: one contiguous run ``[start, start + length)``, or an index."""

    start: int
    length: int
    index: Optional[torch.Tensor]  # int64 slots when not contiguous


def slot_run(row: torch.Tensor, length: int) -> SlotRun:
    slots = row[:length].to(torch.int64)
    if length == 0:
        return SlotRun(0, 0, None)
    first = int(slots[0])
    if int(slots[-1]) - first + 1 == length and (
            length == 1 or bool(torch.all(slots[1:] - slots[:-1] == 1))):
        return SlotRun(first, length, None)
    return SlotRun(first, length, slots)


class TorchNativeAttnBackend(AttentionBackend):
    """Exact attention on the CPU with GQA and per-slot log-weight bias.

    ``host_pool``: the host tier a recall policy's selections read from when they name no
    ``host_tier`` of their own (set by the model runner when there is one)."""

    def __init__(self) -> None:
        self.host_pool: Optional["HostKVPool"] = None

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """Resolve each request's cached slots once per forward pass (shared by all layers)."""
        table = forward_batch.req_to_token_pool.req_to_token
        if forward_batch.forward_mode.is_decode():
            lengths = forward_batch.seq_lens  # including the new token
        else:
            lengths = forward_batch.extend_prefix_lens
        runs = [slot_run(table[r], n) for r, n in zip(forward_batch.req_pool_indices, lengths)]
        device = forward_batch.token_to_kv_pool.k_buffer[0].device
        for run in runs:
            if run.index is not None:
                run.index = run.index.to(device)
        forward_batch.attn_metadata = runs

    @staticmethod
    def _read(pool: MHATokenToKVPool, layer_id: int, run: SlotRun
              ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """K, V as ``[1, kv_heads, len, dim]`` and the log-weight mask ``[1, kv, 1, len]``."""
        kb, vb, wb = pool.k_buffer[layer_id], pool.v_buffer[layer_id], pool.weight_buffer[layer_id]
        if run.index is None:
            sl = slice(run.start, run.start + run.length)
            k, v, w = kb[:, sl], vb[:, sl], (None if pool.uniform_weights else wb[:, sl])
        else:
            k, v = kb.index_select(1, run.index), vb.index_select(1, run.index)
            w = None if pool.uniform_weights else wb.index_select(1, run.index)
        mask = None if w is None else torch.log(w).unsqueeze(0).unsqueeze(2).to(k.dtype)
        return k.unsqueeze(0), v.unsqueeze(0), mask

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                       forward_batch: ForwardBatch, scaling: float) -> torch.Tensor:
        pool = forward_batch.token_to_kv_pool
        pool.set_kv_buffer(layer_id, forward_batch.out_cache_loc, k, v)
        n_q, dim = q.shape[1], q.shape[2]
        n_kv = pool.num_kv_heads
        out = torch.empty_like(q)
        selector = forward_batch.slot_selector
        for i, run in enumerate(forward_batch.attn_metadata):
            sel = (selector.select(layer_id, i, q[i:i + 1], run.length)
                   if selector is not None else None)
            if sel is not None:
                out[i] = self._attend_selection(pool, layer_id, q[i:i + 1], sel, scaling)[0][0]
                continue
            keys, values, mask = self._read(pool, layer_id, run)
            query = q[i].view(1, n_kv, n_q // n_kv, dim)
            o, _ = flash_attention(query, keys, values, scaling, mask=mask)
            out[i] = o.reshape(n_q, dim)
        return out

    def _gather_selection(self, pool: MHATokenToKVPool, layer_id: int, n_q: int,
                          sel: Selection) -> tuple[torch.Tensor, torch.Tensor,
                                                   Optional[torch.Tensor]]:
        """K, V ``[q_heads, n, dim]`` and the logit bias ``[1, q_heads, 1, n]`` (or None) of a
        :class:`Selection`'s device slots, per query head (with the pool's or the selection's
        log-weights); its host slots are attended apart (:meth:`_attend_host`)."""
        device = pool.k_buffer[layer_id].device
        kv_head = torch.arange(n_q, device=device) // (n_q // pool.num_kv_heads)
        slots = sel.query_head_slots(n_q)
        n = slots.shape[1]
        keys, values, rows = _gather_head_rows(pool, layer_id, kv_head, slots)
        bias = sel.log_weight
        if bias is None and not pool.uniform_weights:
            bias = torch.log(pool.weight_buffer[layer_id].view(-1).index_select(0, rows)
                             ).view(n_q, n)
        mask = None if bias is None else bias.unsqueeze(1).unsqueeze(0).to(keys.dtype)
        return keys, values, mask

    def _attend_selection(self, pool: MHATokenToKVPool, layer_id: int, q: torch.Tensor,
                          sel: Selection, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One request's attention (``q [T, q_heads, dim]``) over a :class:`Selection`:
        ``o [T, q_heads, dim]`` and ``lse [T, q_heads]``.

        Per-head slot lists are gathered per query head. Per-KV-head lists (ClusterKV's
        group unions) and slots shared by every head (recall: the whole row, with per-head
        biases masking recalled centroids) are read once per KV head. Host rows are
        attended apart, merged by LSE."""
        n_q = q.shape[1]
        if sel.kv_head_lists:
            o, lse = grouped_attention(q, *self._read_kv_head_lists(pool, layer_id, sel), scaling)
        elif sel.slots.dim() == 2:
            keys, values, mask = self._gather_selection(pool, layer_id, n_q, sel)
            o, lse = flash_attention(q.transpose(0, 1)[None], keys[None], values[None], scaling,
                                     mask=mask)
            o, lse = o[0].transpose(0, 1), lse[0].transpose(0, 1)
        else:
            o, lse = grouped_attention(q, *self._read_shared(pool, layer_id, sel), scaling)
        if sel.host_slots is not None and sel.host_slots.shape[-1]:
            o, lse = merge_attention(o, lse, *self._attend_host(pool, layer_id, q, sel, scaling))
        return o, lse

    @staticmethod
    def _read_kv_head_lists(pool: MHATokenToKVPool, layer_id: int, sel: Selection
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K, V ``[1, kv_heads, n, dim]`` of a selection's per-KV-head lists and its bias
        ``[kv_heads, group, n]`` (the selection's, in place of the pool's log-weights)."""
        n_kv, n = sel.slots.shape
        assert sel.log_weight is not None, "per-KV-head lists carry a per-query-head mask"
        keys, values, _ = _gather_head_rows(
            pool, layer_id, torch.arange(n_kv, device=sel.slots.device), sel.slots)
        return keys[None], values[None], sel.log_weight.view(n_kv, -1, n).to(keys.dtype)

    @staticmethod
    def _read_shared(pool: MHATokenToKVPool, layer_id: int, sel: Selection
                     ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """K, V ``[1, kv_heads, n, dim]`` of a selection's shared slots, and its bias:
        ``[kv_heads, group, n]`` per query head, or the pool's ``[1, kv_heads, 1, n]``."""
        idx = sel.slots.to(pool.k_buffer[layer_id].device, torch.int64)
        keys = pool.k_buffer[layer_id].index_select(1, idx)[None]
        values = pool.v_buffer[layer_id].index_select(1, idx)[None]
        n_kv, n = pool.num_kv_heads, idx.numel()
        if sel.log_weight is not None:
            mask = sel.log_weight.reshape(n_kv, -1, n).to(keys.dtype)
        elif not pool.uniform_weights:
            mask = torch.log(pool.weight_buffer[layer_id].index_select(1, idx))
            mask = mask.view(1, n_kv, 1, n).to(keys.dtype)
        else:
            mask = None
        return keys, values, mask

    def _attend_host(self, pool: MHATokenToKVPool, layer_id: int, q: torch.Tensor,
                     sel: Selection, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over a selection's host rows (``host_slots [q_heads, m]``); a query head
        with none live gets output 0 and LSE -inf."""
        n_q = q.shape[1]
        tier = sel.host_tier if sel.host_tier is not None else self.host_pool
        assert tier is not None, "a host-tier selection needs a host pool"
        kv_head = torch.arange(n_q, device=q.device) // (n_q // pool.num_kv_heads)
        hk, hv = tier.gather(layer_id, kv_head, sel.host_slots)
        mask = None if sel.host_log_weight is None else \
            sel.host_log_weight.to(q.device, q.dtype)[None, :, None, :]
        o, lse = flash_attention(q.transpose(0, 1)[None], hk.to(q)[None], hv.to(q)[None],
                                 scaling, mask=mask)
        o, lse = o[0].transpose(0, 1), lse[0].transpose(0, 1)
        if sel.host_log_weight is not None:
            # The CPU kernel gives a row with every key masked output 0 and LSE 0 (not -inf),
            # which the merge would count as real attention mass.
            dead = torch.isneginf(sel.host_log_weight).all(dim=-1).to(q.device)  # [q_heads]
            lse = lse.masked_fill(dead, float("-inf"))
        return o, lse

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                       forward_batch: ForwardBatch, scaling: float) -> torch.Tensor:
        pool = forward_batch.token_to_kv_pool
        pool.set_kv_buffer(layer_id, forward_batch.out_cache_loc, k, v)
        n_q = q.shape[1]
        n_kv = pool.num_kv_heads
        group = n_q // n_kv
        out = torch.empty_like(q)
        start = 0
        selector = forward_batch.slot_selector
        for i, run in enumerate(forward_batch.attn_metadata):
            ext = forward_batch.extend_seq_lens[i]
            q_req = q[start:start + ext]
            # New tokens, causally among themselves (K/V expanded to the query heads).
            k_new = k[start:start + ext].repeat_interleave(group, dim=1).transpose(0, 1)[None]
            v_new = v[start:start + ext].repeat_interleave(group, dim=1).transpose(0, 1)[None]
            o_new, lse_new = flash_attention(q_req.transpose(0, 1)[None], k_new, v_new, scaling,
                                             causal=True)
            o_new = o_new[0].transpose(0, 1)  # [ext, n_q, dim]
            sel = (selector.select(layer_id, i, q_req, run.length)
                   if selector is not None and run.length else None)
            if sel is not None:
                # A per-head selection of the cached slots (e.g. recalled raw tokens).
                o_c, lse_c = self._attend_selection(pool, layer_id, q_req, sel, scaling)
            elif run.length:
                # Cached slots, no causal mask: the group's query heads become extra rows.
                o_c, lse_c = grouped_attention(q_req, *self._read(pool, layer_id, run), scaling)
            if run.length:
                o_new, _ = merge_attention(o_c, lse_c, o_new, lse_new[0].transpose(0, 1))
            out[start:start + ext] = o_new
            start += ext
        return out
