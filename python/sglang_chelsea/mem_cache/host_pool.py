"""The host-memory tier: raw K/V that recall policies bring back on demand.

Same head-major layout as the device pool (``[kv_heads, slots, head_dim]`` per layer),
always in host memory, with its own slot allocator (slot 0 reserved as padding). On a
CPU-only machine both tiers are host memory, but the accounting is kept apart: the device
pool holds what attention always reads, the host pool what it may recall.
"""

from __future__ import annotations

import torch

from sglang_chelsea.mem_cache.memory_pool import TokenToKVPoolAllocator, head_rows


class HostKVPool:
    """Raw K/V of compressed chunks, per layer, in host memory."""

    def __init__(self, size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype) -> None:
        self.size = size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.allocator = TokenToKVPoolAllocator(size)
        pin = torch.cuda.is_available()
        self.k_buffer = [torch.zeros((num_kv_heads, size + 1, head_dim), dtype=dtype,
                                     pin_memory=pin) for _ in range(num_layers)]
        self.v_buffer = [torch.zeros((num_kv_heads, size + 1, head_dim), dtype=dtype,
                                     pin_memory=pin) for _ in range(num_layers)]

    def used_slots(self) -> int:
        return self.size - self.allocator.available_size()

    def gather(self, layer_id: int, kv_head: torch.Tensor, slots: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V ``[rows, n, head_dim]`` of ``slots [rows, n]`` read from KV head
        ``kv_head[rows]`` (host tensors; the caller moves them to the device)."""
        rows, n = slots.shape
        flat = head_rows(kv_head, slots, self.size + 1)
        k = self.k_buffer[layer_id].view(-1, self.head_dim).index_select(0, flat)
        v = self.v_buffer[layer_id].view(-1, self.head_dim).index_select(0, flat)
        return k.view(rows, n, -1), v.view(rows, n, -1)
