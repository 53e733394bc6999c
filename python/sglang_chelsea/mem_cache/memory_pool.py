"""Memory pools: ReqToTokenPool, the KV slot allocator and the per-layer K/V buffers.

Every buffer is allocated once at start-up; nothing grows per step.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


class ReqToTokenPool:
    """Maps (request slot, physical position) -> KV slot index (an int32 table)."""

    def __init__(self, size: int, max_context_len: int) -> None:
        self.size = size
        self.max_context_len = max_context_len
        self.req_to_token = torch.zeros((size, max_context_len), dtype=torch.int32)
        self.free_slots: list[int] = list(range(size))

    def available_size(self) -> int:
        return len(self.free_slots)

    def alloc(self) -> Optional[int]:
        if not self.free_slots:
            return None
        return self.free_slots.pop(0)

    def free(self, req_pool_idx: int) -> None:
        assert req_pool_idx not in self.free_slots, f"double free of request slot {req_pool_idx}"
        self.free_slots.append(req_pool_idx)

    def clear(self) -> None:
        self.free_slots = list(range(self.size))


class TokenToKVPoolAllocator:
    """Hands out free KV slot indices. Slot 0 is reserved as the padding target."""

    def __init__(self, size: int) -> None:
        self.size = size  # usable slots: 1..size
        # Called with every freed index tensor (a policy drops what it built on them).
        self.free_listeners: list[Callable[[torch.Tensor], None]] = []
        self.clear()

    def clear(self) -> None:
        self.free_slots = torch.arange(1, self.size + 1, dtype=torch.int64)
        self._release: list[torch.Tensor] = []

    def _merge_released(self) -> None:
        if self._release:
            self.free_slots = torch.cat([self.free_slots, *self._release])
            self._release = []

    def available_size(self) -> int:
        return len(self.free_slots) + sum(len(t) for t in self._release)

    def alloc(self, need: int) -> Optional[torch.Tensor]:
        """Return ``need`` free slot indices (int64), or None when not enough are free."""
        if need > len(self.free_slots):
            self._merge_released()
            # Reuse low indices first: keeps a request's slots close together.
            self.free_slots, _ = torch.sort(self.free_slots)
        if need > len(self.free_slots):
            return None
        out = self.free_slots[:need]
        self.free_slots = self.free_slots[need:]
        return out

    def free(self, indices: torch.Tensor) -> None:
        if indices.numel() == 0:
            return
        freed = indices.to(torch.int64).clone()
        self._release.append(freed)
        for listener in self.free_listeners:
            listener(freed)


class MHATokenToKVPool:
    """Per-layer K and V buffers ``[kv_heads, num_slots, head_dim]`` plus slot weights.

    Head-major, so one head's keys for a run of slots are contiguous in memory (decode
    attention streams them). ``weight_buffer[layer][head, slot]`` is how many tokens the
    slot stands for (1 for a raw token, a cluster size for a centroid, 0 for an unused
    padding slot). Attention adds ``log(weight)`` to the slot's logit. ``uniform_weights``
    is True when no policy writes weights other than 1 (set once by the scheduler), letting
    the attention backend skip the bias.
    """

    def __init__(self, size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str = "cpu") -> None:
        self.size = size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        n = size + 1  # slot 0 is the padding slot
        self.k_buffer = [torch.zeros((num_kv_heads, n, head_dim), dtype=dtype, device=device)
                         for _ in range(num_layers)]
        self.v_buffer = [torch.zeros((num_kv_heads, n, head_dim), dtype=dtype, device=device)
                         for _ in range(num_layers)]
        self.weight_buffer = [torch.ones((num_kv_heads, n), dtype=torch.float32, device=device)
                              for _ in range(num_layers)]
        self.uniform_weights = True

    def set_kv_buffer(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> None:
        """Write raw (weight 1) K/V ``[T, kv_heads, head_dim]`` for new tokens at slots ``loc``."""
        self.k_buffer[layer_id][:, loc] = k.transpose(0, 1).to(self.dtype)
        self.v_buffer[layer_id][:, loc] = v.transpose(0, 1).to(self.dtype)
        if not self.uniform_weights:
            # index_fill_ with a Python scalar: no host-to-device copy (CUDA-graph safe).
            self.weight_buffer[layer_id].index_fill_(1, loc, 1.0)


def head_rows(kv_head: torch.Tensor, slots: torch.Tensor, width: int) -> torch.Tensor:
    """Flat row numbers of ``slots [rows, n]`` read from KV head ``kv_head[rows]`` in the
    ``[kv_heads * width, ...]`` view of a head-major buffer (``width`` slots per head), for
    one ``index_select`` (much cheaper than 2-D indexing on the CPU)."""
    return (slots + (kv_head * width)[:, None]).reshape(-1)


def kv_bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one KV slot costs across all layers (K, V and the float32 weight)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return num_layers * num_kv_heads * (2 * head_dim * elem + 4)
