"""The GPU attention backend: Triton paged decode and extend kernels over the KV pool.

Per forward pass, each request's cached slots are flattened into ``kv_indptr`` /
``kv_indices`` (built from the CPU ``req_to_token`` table, copied to the GPU once, shared
by all layers). The kernels add each slot's ``log(weight)`` per KV head unless the pool's
weights are uniform, so Chelsea centroids count as their cluster sizes.

Selecting KV policies (ClusterKV, Chelsea recall) hand over a per-layer
:class:`~sglang_chelsea.compression.base.Selection` per request (the forward batch's
``slot_selector``). In a layer where any request has one, the lists become per
(request, query head) (``per_head`` kernels): a selection's rows with its ``log_weight``
as each entry's bias (else the pool's ``log(weight)``), a request without one its whole
list repeated per query head with the pool's log-weights. A selection's host-tier slots
are gathered from the :class:`HostKVPool` on the host into a small device staging buffer
per layer and step (as the torch backend does) and attended as a second segment, merged
with the first by log-sum-exp; decode and extend (prefill chunks over a compressed
prefix, Chelsea recall) both run in the Triton kernels. :class:`TorchNativeAttnBackend`'s
``_attend_selection`` is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sglang_chelsea.attention.base_backend import AttentionBackend
from sglang_chelsea.attention.slot_lists import flatten_slot_lists, indptr_of
from sglang_chelsea.kernels.paged_attention_triton import (
    choose_num_kv_splits,
    decode_attention,
    decode_partials,
    extend_attention,
    merge_partials,
)
from sglang_chelsea.mem_cache.memory_pool import MHATokenToKVPool, head_rows
from sglang_chelsea.model_executor.forward_batch_info import ForwardBatch

if TYPE_CHECKING:
    from sglang_chelsea.compression.base import Selection
    from sglang_chelsea.mem_cache.host_pool import HostKVPool


@dataclass
class TritonMetadata:
    """Slot lists of one forward pass, on the model's device."""

    kv_indptr: torch.Tensor  # [B + 1] int32
    kv_indices: torch.Tensor  # [sum of lengths] int32 (one padding slot when empty)
    q_start: torch.Tensor  # [B] int32: first new token of each request (extend)
    num_kv_splits: int
    offsets: list[int] | None = None  # kv_indptr on the host (for per-head lists)


@dataclass
class HeadLists:
    """One layer's per-(request, query head) lists (row ``b * q_heads + h``): device-pool
    slots with a bias per entry, and optionally staged host-tier rows with theirs."""

    indptr: torch.Tensor  # [B * q_heads + 1] int32
    indices: torch.Tensor  # int32 pool slots
    bias: torch.Tensor  # float32 per index
    max_len: int
    host: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
    # host: K and V views [kv_heads, rows, D] of the staging buffer (head stride 0),
    # indptr, indices (staging rows) and bias


def _cat_or_pad(parts: list[torch.Tensor], dtype: torch.dtype, device: torch.device
                ) -> torch.Tensor:
    """The parts concatenated in ``dtype``; one zero when there is nothing (a kernel
    argument is never an empty tensor)."""
    if not parts or sum(p.numel() for p in parts) == 0:
        return torch.zeros(1, dtype=dtype, device=device)
    return torch.cat([p.reshape(-1).to(device, dtype) for p in parts])


class TritonAttnBackend(AttentionBackend):
    """Paged attention with the per-slot size bias, in Triton (GPU; CPU via TRITON_INTERPRET).

    ``num_kv_splits`` fixes the decode split count (tests); by default it is chosen per
    batch to fill the GPU.
    """

    def __init__(self, num_kv_splits: int | None = None) -> None:
        self.fixed_splits = num_kv_splits
        self._num_sms = 0
        self.host_pool: HostKVPool | None = None  # set by the model runner (recall)

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
            q_start=q_start.to(device, non_blocking=True), num_kv_splits=splits,
            offsets=indptr.tolist())

    def init_cuda_graph_state(self, max_bs: int, pool: MHATokenToKVPool,
                              max_context_len: int) -> None:
        dev = pool.k_buffer[0].device
        # Capture-time lists: one slot (the padding slot 0) per request; the index buffer
        # holds the whole pool, so any mix of lengths fits at replay.
        self._graph_indptr = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self._graph_indices = torch.zeros(pool.size + 1, dtype=torch.int32, device=dev)
        self._graph_q_start = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self._graph_shape = (pool.num_kv_heads, max_context_len, dev)

    def init_forward_metadata_capture_cuda_graph(self, bs: int) -> TritonMetadata:
        kv_heads, context_len, dev = self._graph_shape
        # The split count is fixed in the graph: chosen for the longest context.
        splits = self.num_kv_splits(bs, kv_heads, context_len, dev)
        return TritonMetadata(self._graph_indptr[:bs + 1], self._graph_indices,
                              self._graph_q_start[:bs], splits)

    def init_forward_metadata_replay_cuda_graph(self, forward_batch: ForwardBatch,
                                                padded_bs: int) -> None:
        bs = forward_batch.batch_size
        indptr, indices = flatten_slot_lists(forward_batch.req_to_token_pool.req_to_token,
                                             forward_batch.req_pool_indices,
                                             list(forward_batch.seq_lens))
        self._graph_indptr[:bs + 1].copy_(indptr, non_blocking=True)
        if padded_bs > bs:  # extra rows: empty lists
            self._graph_indptr[bs + 1:padded_bs + 1].fill_(int(indptr[-1]))
        self._graph_indices[:indices.numel()].copy_(indices, non_blocking=True)

    @staticmethod
    def _store_new_kv(layer_id: int, forward_batch: ForwardBatch, k: torch.Tensor,
                      v: torch.Tensor
                      ) -> tuple[MHATokenToKVPool, TritonMetadata, torch.Tensor | None]:
        """Write the new tokens' K/V; return the pool, this pass's metadata and the layer's
        slot weights (None when the policy keeps them uniform)."""
        pool = forward_batch.token_to_kv_pool
        pool.set_kv_buffer(layer_id, forward_batch.out_cache_loc, k, v)
        weights = None if pool.uniform_weights else pool.weight_buffer[layer_id]
        return pool, forward_batch.attn_metadata, weights

    def _head_lists(self, layer_id: int, forward_batch: ForwardBatch, q: torch.Tensor
                    ) -> HeadLists | None:
        """Ask the batch's selector for each request's selection in this layer (decode: every
        request; extend: those with a cached prefix); None when no request has one."""
        selector = forward_batch.slot_selector
        if selector is None:
            return None
        meta: TritonMetadata = forward_batch.attn_metadata
        assert meta.offsets is not None
        decode = forward_batch.forward_mode.is_decode()
        if decode:  # the selector's batched lane, when it has one
            batch = selector.select_batch(layer_id, q, meta.kv_indices, meta.offsets)
            if batch is None:
                return None
            if batch is not NotImplemented:
                return HeadLists(batch.indptr, batch.indices, batch.bias, batch.max_len, None)
        sels: list[Selection | None] = []
        start = 0
        for i in range(forward_batch.batch_size):
            n_slots = meta.offsets[i + 1] - meta.offsets[i]
            n_tok = 1 if decode else forward_batch.extend_seq_lens[i]
            q_i = q[start:start + n_tok]
            start += n_tok
            sels.append(selector.select(layer_id, i, q_i, n_slots)
                        if decode or n_slots else None)
        if all(sel is None for sel in sels):
            return None
        return self._flatten_selections(forward_batch.token_to_kv_pool, layer_id, meta, sels,
                                        q.shape[1])

    def _flatten_selections(self, pool: MHATokenToKVPool, layer_id: int, meta: TritonMetadata,
                            sels: list[Selection | None], n_q: int) -> HeadLists:
        """Per-(request, query head) lists of ``sels`` (None: the request's whole list)."""
        device = pool.k_buffer[layer_id].device
        dim = pool.head_dim
        kv_head = torch.arange(n_q, device=device) // (n_q // pool.num_kv_heads)
        kv_head_cpu = kv_head.cpu()
        slot_parts, bias_parts, lens = [], [], []
        host_k, host_v, host_b, host_lens = [], [], [], []
        assert meta.offsets is not None
        for i, sel in enumerate(sels):
            if sel is None:
                row = meta.kv_indices[meta.offsets[i]:meta.offsets[i + 1]]
                slots, log_w = row.to(torch.int64).expand(n_q, -1), None
            else:
                slots = sel.query_head_slots(n_q)
                slots, log_w = slots.to(device, torch.int64), sel.log_weight
            n = slots.shape[1]
            if log_w is None and pool.uniform_weights:
                log_w = torch.zeros(n_q, n, device=device)
            elif log_w is None:
                rows = head_rows(kv_head, slots, pool.size + 1)
                log_w = torch.log(pool.weight_buffer[layer_id].view(-1).index_select(0, rows))
            slot_parts.append(slots)
            bias_parts.append(log_w)
            lens += [n] * n_q
            m = 0
            if sel is not None and sel.host_slots is not None:
                tier = sel.host_tier if sel.host_tier is not None else self.host_pool
                assert tier is not None, "a host-tier selection needs a host pool"
                k_h, v_h = tier.gather(layer_id, kv_head_cpu, sel.host_slots.cpu())
                m = k_h.shape[1]
                host_k.append(k_h.reshape(-1, dim))
                host_v.append(v_h.reshape(-1, dim))
                host_b.append(sel.host_log_weight if sel.host_log_weight is not None
                              else torch.zeros(sel.host_slots.shape, device=device))
            host_lens += [m] * n_q
        host = None
        if sum(host_lens):
            dtype = pool.k_buffer[layer_id].dtype
            staged_k = torch.cat(host_k).to(device, dtype, non_blocking=True)
            staged_v = torch.cat(host_v).to(device, dtype, non_blocking=True)
            n_kv = pool.num_kv_heads
            host = (staged_k[None].expand(n_kv, -1, -1), staged_v[None].expand(n_kv, -1, -1),
                    indptr_of(host_lens).to(device, non_blocking=True),
                    torch.arange(staged_k.shape[0], dtype=torch.int32, device=device),
                    _cat_or_pad(host_b, torch.float32, device))
        return HeadLists(indptr_of(lens).to(device, non_blocking=True),
                         _cat_or_pad(slot_parts, torch.int32, device),
                         _cat_or_pad(bias_parts, torch.float32, device), max(lens), host)

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                       forward_batch: ForwardBatch, scaling: float) -> torch.Tensor:
        pool, meta, weights = self._store_new_kv(layer_id, forward_batch, k, v)
        q = q.contiguous()
        lists = self._head_lists(layer_id, forward_batch, q)
        if lists is None:
            return decode_attention(q, pool.k_buffer[layer_id], pool.v_buffer[layer_id],
                                    weights, meta.kv_indptr, meta.kv_indices, scaling,
                                    num_kv_splits=meta.num_kv_splits)
        bsz, n_q, _ = q.shape
        splits = self.num_kv_splits(bsz, n_q, lists.max_len, q.device)
        mid_o, mid_lse = decode_partials(q, pool.k_buffer[layer_id], pool.v_buffer[layer_id],
                                         None, lists.indptr, lists.indices, scaling, splits,
                                         bias=lists.bias, per_head=True)
        if lists.host is not None:
            hk, hv, h_indptr, h_indices, h_bias = lists.host
            host_o, host_lse = decode_partials(q, hk, hv, None, h_indptr, h_indices, scaling,
                                               bias=h_bias, per_head=True)
            mid_o = torch.cat([mid_o, host_o], dim=2)
            mid_lse = torch.cat([mid_lse, host_lse], dim=2)
        return merge_partials(mid_o, mid_lse)[0].to(q.dtype)

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                       forward_batch: ForwardBatch, scaling: float) -> torch.Tensor:
        pool, meta, weights = self._store_new_kv(layer_id, forward_batch, k, v)
        ext_lens = list(forward_batch.extend_seq_lens)
        lists = self._head_lists(layer_id, forward_batch, q)
        if lists is None:
            return extend_attention(q, k, v, pool.k_buffer[layer_id], pool.v_buffer[layer_id],
                                    weights, meta.kv_indptr, meta.kv_indices, meta.q_start,
                                    ext_lens, scaling)
        if lists.host is None:
            return extend_attention(q, k, v, pool.k_buffer[layer_id], pool.v_buffer[layer_id],
                                    None, lists.indptr, lists.indices, meta.q_start, ext_lens,
                                    scaling, bias=lists.bias, per_head=True)
        out, lse = extend_attention(q, k, v, pool.k_buffer[layer_id], pool.v_buffer[layer_id],
                                    None, lists.indptr, lists.indices, meta.q_start, ext_lens,
                                    scaling, bias=lists.bias, per_head=True, return_lse=True)
        hk, hv, h_indptr, h_indices, h_bias = lists.host
        host_o, host_lse = extend_attention(q, None, None, hk, hv, None, h_indptr, h_indices,
                                            meta.q_start, ext_lens, scaling, bias=h_bias,
                                            per_head=True, return_lse=True)
        out, _ = merge_partials(torch.stack([out, host_o], dim=-2),
                                torch.stack([lse, host_lse], dim=-1))
        return out.to(q.dtype)
