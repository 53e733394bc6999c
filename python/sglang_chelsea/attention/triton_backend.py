"""The GPU attention backend: Triton paged decode and extend kernels over the KV pool.

Per forward pass, each request's cached slots are flattened into ``kv_indptr`` /
``kv_indices`` (built from the CPU ``req_to_token`` table, copied to the GPU once, shared
by all layers). The kernels add each slot's ``log(weight)`` per KV head unless the pool's
weights are uniform, so Chelsea centroids count as their cluster sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sglang_chelsea.attention.base_backend import AttentionBackend
from sglang_chelsea.kernels.paged_attention_triton import (
    choose_num_kv_splits,
    decode_attention,
    extend_attention,
)
from sglang_chelsea.mem_cache.memory_pool import MHATokenToKVPool
from sglang_chelsea.model_executor.forward_batch_info import ForwardBatch


@dataclass
class TritonMetadata:
    """Slot lists of one forward pass, on the model's device."""

    kv_indptr: torch.Tensor  # [B + 1] int32
    kv_indices: torch.Tensor  # [sum of lengths] int32 (one padding slot when empty)
    q_start: torch.Tensor  # [B] int32: first new token of each request (extend)
    num_kv_splits: int


def flatten_slot_lists(table: torch.Tensor, rows: list[int], lengths: list[int]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_indptr`` and ``kv_indices`` (int32, CPU) of the first ``lengths[i]`` slots of
    ``table[rows[i]]``."""
    indptr = torch.zeros(len(rows) + 1, dtype=torch.int32)
    if lengths:
        indptr[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    parts = [table[r, :n] for r, n in zip(rows, lengths) if n]
    indices = torch.cat(parts) if parts else torch.zeros(1, dtype=torch.int32)
    return indptr, indices


class TritonAttnBackend(AttentionBackend):
    """Paged attention with the per-slot size bias, in Triton (GPU; CPU via TRITON_INTERPRET).

    ``num_kv_splits`` fixes the decode split count (tests); by default it is chosen per
    batch to fill the GPU.
    """

    def __init__(self, num_kv_splits: int | None = None) -> None:
        self.fixed_splits = num_kv_splits
        self._num_sms = 0

    def num_kv_splits(self, batch: int, kv_heads: int, max_len: int,
                      device: torch.device) -> int:
        """Decode splits of each slot list for this batch shape (the CUDA graphs use it too)."""
        if self.fixed_splits is not None:
            return self.fixed_splits
        if device.type != "cuda":
            return 1
        if not self._num_sms:
            self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        return choose_num_kv_splits(batch, kv_heads, max_len, self._num_sms)

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        pool = forward_batch.token_to_kv_pool
        device = pool.k_buffer[0].device
        decode = forward_batch.forward_mode.is_decode()
        lengths = forward_batch.seq_lens if decode else forward_batch.extend_prefix_lens
        indptr, indices = flatten_slot_lists(forward_batch.req_to_token_pool.req_to_token,
                                             forward_batch.req_pool_indices, list(lengths))
        q_start = torch.zeros(forward_batch.batch_size, dtype=torch.int32)
        if not decode and forward_batch.batch_size > 1:
            q_start[1:] = torch.cumsum(
                torch.tensor(forward_batch.extend_seq_lens[:-1], dtype=torch.int64), 0)
        splits = self.num_kv_splits(forward_batch.batch_size, pool.num_kv_heads,
                              max(lengths, default=1), device) if decode else 1
        forward_batch.attn_metadata = TritonMetadata(
            kv_indptr=indptr.to(device, non_blocking=True),
            kv_indices=indices.to(device, non_blocking=True),
            q_start=q_start.to(device, non_blocking=True), num_kv_splits=splits)

    @staticmethod
    def _store_new_kv(layer_id: int, forward_batch: ForwardBatch, k: torch.Tensor,
                      v: torch.Tensor
                      ) -> tuple[MHATokenToKVPool, TritonMetadata, Optional[torch.Tensor]]:
        """Write the new tokens' K/V; return the pool, this pass's metadata and the layer's
        slot weights (None when the policy keeps them uniform)."""
        pool = forward_batch.token_to_kv_pool
        pool.set_kv_buffer(layer_id, forward_batch.out_cache_loc, k, v)
        weights = None if pool.uniform_weights else pool.weight_buffer[layer_id]
        return pool, forward_batch.attn_metadata, weights

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                       forward_batch: ForwardBatch, scaling: float) -> torch.Tensor:
        pool, meta, weights = self._store_new_kv(layer_id, forward_batch, k, v)
        return decode_attention(q.contiguous(), pool.k_buffer[layer_id], pool.v_buffer[layer_id],
                                weights, meta.kv_indptr, meta.kv_indices, scaling,
                                num_kv_splits=meta.num_kv_splits)

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                       forward_batch: ForwardBatch, scaling: float) -> torch.Tensor:
        pool, meta, weights = self._store_new_kv(layer_id, forward_batch, k, v)
        return extend_attention(q, k, v, pool.k_buffer[layer_id], pool.v_buffer[layer_id],
                                weights, meta.kv_indptr, meta.kv_indices, meta.q_start,
                                list(forward_batch.extend_seq_lens), scaling)
