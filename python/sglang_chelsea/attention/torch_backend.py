"""The CPU attention backend: torch SDPA over slots gathered from the KV pool.

GQA is handled without copying K/V per query head: the queries of one KV head's group
are stacked as extra query rows (row ``t * G + g`` is token ``t``, group member ``g``).
The per-slot, per-KV-head weight enters as an additive ``log(weight)`` logit bias.
Softmax is computed in the activation dtype's precision (float32 on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sglang_chelsea.attention.base_backend import AttentionBackend
from sglang_chelsea.model_executor.forward_batch_info import ForwardBatch

# Largest number of mask elements materialised per query block in extend.
_MASK_BUDGET = 1 << 22


@dataclass
class DecodeMetadata:
    slot_index: torch.Tensor  # [B * maxP] slots, padded with slot 0
    pad_mask: Optional[torch.Tensor]  # [B, 1, 1, maxP] 0 / -inf, None when no padding
    max_len: int


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: Optional[torch.Tensor], scaling: float) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) v with explicit matmuls.

    On the CPU this is steadier than SDPA for one-token queries and additive masks
    (measured: SDPA with a broadcast float mask fell to a slow path).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scaling)
    if mask is not None:
        scores = scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class TorchNativeAttnBackend(AttentionBackend):
    """Exact attention on the CPU with GQA and per-slot log-weight bias."""

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        if not forward_batch.forward_mode.is_decode():
            forward_batch.attn_metadata = None
            return
        table = forward_batch.req_to_token_pool.req_to_token
        lens = forward_batch.seq_lens
        max_len = max(lens)
        rows = torch.tensor(forward_batch.req_pool_indices, dtype=torch.int64)
        index = table[rows, :max_len].to(torch.int64)
        pad_mask = None
        if min(lens) != max_len:
            ar = torch.arange(max_len).unsqueeze(0)
            valid = ar < torch.tensor(lens).unsqueeze(1)
            index = torch.where(valid, index, torch.zeros_like(index))
            pad_mask = torch.zeros(valid.shape, dtype=torch.float32)
            pad_mask.masked_fill_(~valid, float("-inf"))
            pad_mask = pad_mask[:, None, None, :]
        forward_batch.attn_metadata = DecodeMetadata(index.reshape(-1), pad_mask, max_len)

    @staticmethod
    def _log_weight(forward_batch: ForwardBatch, layer_id: int,
                    slots: torch.Tensor) -> Optional[torch.Tensor]:
        """``log(weight)`` of ``slots`` per KV head, ``[..., kv_heads]``; None when all are 1."""
        pool = forward_batch.token_to_kv_pool
        if pool.uniform_weights:
            return None
        return torch.log(pool.weight_buffer[layer_id].index_select(0, slots))

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                       forward_batch: ForwardBatch, scaling: float) -> torch.Tensor:
        pool = forward_batch.token_to_kv_pool
        pool.set_kv_buffer(layer_id, forward_batch.out_cache_loc, k, v)
        meta: DecodeMetadata = forward_batch.attn_metadata
        bsz, n_q, dim = q.shape
        n_kv = pool.num_kv_heads
        group = n_q // n_kv
        keys = pool.k_buffer[layer_id].index_select(0, meta.slot_index)
        values = pool.v_buffer[layer_id].index_select(0, meta.slot_index)
        keys = keys.view(bsz, meta.max_len, n_kv, dim).transpose(1, 2)
        values = values.view(bsz, meta.max_len, n_kv, dim).transpose(1, 2)
        mask = meta.pad_mask
        log_w = self._log_weight(forward_batch, layer_id, meta.slot_index)
        if log_w is not None:
            bias = log_w.view(bsz, meta.max_len, n_kv).transpose(1, 2).unsqueeze(2)
            mask = bias if mask is None else bias + mask
        if mask is not None:
            mask = mask.to(q.dtype)
        query = q.view(bsz, n_kv, group, dim)
        out = masked_attention(query, keys, values, mask, scaling)
        return out.reshape(bsz, n_q, dim)

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                       forward_batch: ForwardBatch, scaling: float) -> torch.Tensor:
        pool = forward_batch.token_to_kv_pool
        pool.set_kv_buffer(layer_id, forward_batch.out_cache_loc, k, v)
        table = forward_batch.req_to_token_pool.req_to_token
        n_q, dim = q.shape[1], q.shape[2]
        n_kv = pool.num_kv_heads
        group = n_q // n_kv
        out = torch.empty_like(q)
        start = 0
        for i in range(forward_batch.batch_size):
            ext = forward_batch.extend_seq_lens[i]
            prefix = forward_batch.extend_prefix_lens[i]
            total = prefix + ext
            slots = table[forward_batch.req_pool_indices[i], :total].to(torch.int64)
            keys = pool.k_buffer[layer_id].index_select(0, slots).transpose(0, 1)
            values = pool.v_buffer[layer_id].index_select(0, slots).transpose(0, 1)
            log_w = self._log_weight(forward_batch, layer_id, slots)
            bias = None if log_w is None else log_w.t().unsqueeze(1)  # [kv, 1, S]
            q_req = q[start:start + ext].view(ext, n_kv, group, dim).transpose(0, 1)
            block = max(16, _MASK_BUDGET // max(1, group * total * (n_kv if bias is not None else 1)))
            for b0 in range(0, ext, block):
                b1 = min(ext, b0 + block)
                rows = torch.arange(prefix + b0, prefix + b1).unsqueeze(1)
                causal = torch.arange(total).unsqueeze(0) <= rows  # [b, S]
                mask = torch.zeros(causal.shape, dtype=q.dtype).masked_fill_(~causal, float("-inf"))
                mask = mask.repeat_interleave(group, dim=0).unsqueeze(0)  # [1, b*G, S]
                if bias is not None:
                    mask = mask + bias.to(q.dtype)
                qb = q_req[:, b0:b1].reshape(n_kv, (b1 - b0) * group, dim)
                ob = masked_attention(qb, keys, values, mask, scaling)
                out[start + b0:start + b1] = ob.view(n_kv, b1 - b0, group, dim).transpose(0, 1) \
                    .reshape(b1 - b0, n_q, dim)
            start += ext
        return out
