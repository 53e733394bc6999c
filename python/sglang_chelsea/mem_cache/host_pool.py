"""The host-memory tier: raw K/V that recall and offload policies bring back on demand.

Same head-major layout as the device pool (``[kv_heads, slots, head_dim]`` per layer),
always in host memory, with its own slot allocator (slot 0 reserved as padding). On a
CPU-only machine both tiers are host memory, but the accounting is kept apart: the device
pool holds what attention always reads, the host pool what it may recall.

Reads that attention makes from this tier go through a :class:`HostReader` (the device
side of the link: it copies rows onto the compute device and counts the bytes):
:meth:`HostReader.stream` for a one-off read (prefill chunks), and a
:class:`DeviceWorkingSet` for a decode request that keeps on the device exactly the rows
its last step attended, copying in only the rows that changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sglang_chelsea.mem_cache.memory_pool import TokenToKVPoolAllocator, head_rows

if TYPE_CHECKING:
    from sglang_chelsea.mem_cache.memory_pool import MHATokenToKVPool


def host_kv_bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int,
                           dtype: torch.dtype) -> int:
    """Bytes one host-tier slot holds: K and V of every layer and KV head (no weight)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return num_layers * num_kv_heads * 2 * head_dim * elem


class HostKVPool:
    """Raw K/V of compressed or offloaded tokens, per layer, in host memory."""

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

    def bytes_per_slot(self) -> int:
        """Bytes one host slot holds (K and V, every layer and KV head)."""
        return host_kv_bytes_per_slot(self.num_layers, self.num_kv_heads, self.head_dim,
                                      self.dtype)

    def store(self, pool: MHATokenToKVPool, slots: torch.Tensor, layers: range
              ) -> torch.Tensor | None:
        """Copy the K/V of device ``slots [n]`` (``layers`` of ``pool``) into ``n`` new host
        slots and return them in the same order (None when the host tier is full)."""
        host_slots = self.allocator.alloc(slots.numel())
        if host_slots is None:
            return None
        src = slots.reshape(-1).to(pool.k_buffer[0].device)
        for layer in layers:
            self.k_buffer[layer][:, host_slots] = pool.k_buffer[layer][:, src].cpu()
            self.v_buffer[layer][:, host_slots] = pool.v_buffer[layer][:, src].cpu()
        return host_slots

    def gather(self, layer_id: int, kv_head: torch.Tensor, slots: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V ``[rows, n, head_dim]`` of ``slots [rows, n]`` read from KV head
        ``kv_head[rows]`` (host tensors; the caller moves them to the device)."""
        rows, n = slots.shape
        flat = head_rows(kv_head.cpu(), slots.cpu(), self.size + 1)
        k, v = self.read_rows(layer_id, flat)
        return k.view(rows, n, -1), v.view(rows, n, -1)

    def read_rows(self, layer_id: int, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V ``[len(flat), head_dim]`` of flat head-major rows (see ``head_rows``)."""
        k = self.k_buffer[layer_id].view(-1, self.head_dim).index_select(0, flat)
        v = self.v_buffer[layer_id].view(-1, self.head_dim).index_select(0, flat)
        return k, v


@dataclass
class TransferStats:
    """Host -> device traffic of one tier: cumulative, and in the current forward pass."""

    rows: int = 0
    bytes: int = 0
    step_rows: int = 0
    step_bytes: int = 0

    def add(self, rows: int, nbytes: int) -> None:
        self.rows += rows
        self.bytes += nbytes
        self.step_rows += rows
        self.step_bytes += nbytes

    def new_step(self) -> None:
        self.step_rows = self.step_bytes = 0


class HostReader:
    """The link from the host tier to the compute device: every host row attention reads
    crosses here, and is counted (``stats``: one row = one token's K and V in one layer and
    KV head)."""

    def __init__(self, host: HostKVPool, device: torch.device) -> None:
        self.host = host
        self.device = device
        elem = torch.empty((), dtype=host.dtype).element_size()
        self.row_bytes = 2 * host.head_dim * elem
        self.stats = TransferStats()

    def fetch(self, layer_id: int, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy flat host rows ``flat`` (any device) onto the compute device."""
        k, v = self.host.read_rows(layer_id, flat.cpu())
        self.stats.add(flat.numel(), flat.numel() * self.row_bytes)
        return (k.to(self.device, non_blocking=True), v.to(self.device, non_blocking=True))

    def flat_rows(self, kv_head: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return head_rows(kv_head.to(slots.device), slots, self.host.size + 1)

    def stream(self, layer_id: int, kv_head: torch.Tensor, slots: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V ``[rows, n, head_dim]`` on the device, read once (nothing stays resident):
        each distinct row crosses once however many query heads read it."""
        rows, n = slots.shape
        flat = self.flat_rows(kv_head, slots)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        k, v = self.fetch(layer_id, uniq)
        inverse = inverse.to(self.device)
        return (k.index_select(0, inverse).view(rows, n, -1),
                v.index_select(0, inverse).view(rows, n, -1))


class HostStream:
    """A host-tier source for one forward pass (``Selection.host_tier``): streamed reads."""

    def __init__(self, reader: HostReader) -> None:
        self.reader = reader

    def gather(self, layer_id: int, kv_head: torch.Tensor, slots: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.reader.stream(layer_id, kv_head, slots)


class DeviceWorkingSet:
    """One request's device copy of the host rows its last decode step attended.

    Per layer, the resident rows are a sorted tensor of flat host rows (one per token and
    KV head: the union of what the KV head's query heads selected) and their K/V on the
    device. :meth:`gather` makes the resident set exactly this step's rows: rows already
    resident are kept (a device-side copy), the others are copied in from the host tier
    (counted by the reader), rows no longer selected are dropped.
    """

    def __init__(self, reader: HostReader) -> None:
        self.reader = reader
        self.rows: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def resident_rows(self) -> int:
        return sum(int(r.numel()) for r in self.rows.values())

    def resident_bytes(self) -> int:
        return self.resident_rows() * self.reader.row_bytes

    def gather(self, layer_id: int, kv_head: torch.Tensor, slots: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V ``[rows, n, head_dim]`` of host ``slots [rows, n]`` read from KV head
        ``kv_head[rows]``, from the device copy (updated first)."""
        reader = self.reader
        rows, n = slots.shape
        flat = reader.flat_rows(kv_head, slots).to(reader.device)
        need = torch.unique(flat)  # sorted
        old = self.rows.get(layer_id)
        k_new = torch.empty((need.numel(), reader.host.head_dim), dtype=reader.host.dtype,
                            device=reader.device)
        v_new = torch.empty_like(k_new)
        if old is None or old.numel() == 0:
            fresh = torch.ones(need.shape, dtype=torch.bool, device=need.device)
        else:
            at = torch.searchsorted(old, need).clamp_(max=old.numel() - 1)
            fresh = old[at] != need
            kept = ~fresh
            k_new[kept] = self.k[layer_id][at[kept]]
            v_new[kept] = self.v[layer_id][at[kept]]
        if bool(fresh.any()):
            k_in, v_in = reader.fetch(layer_id, need[fresh])
            k_new[fresh] = k_in
            v_new[fresh] = v_in
        self.rows[layer_id], self.k[layer_id], self.v[layer_id] = need, k_new, v_new
        idx = torch.searchsorted(need, flat)
        return k_new.index_select(0, idx).view(rows, n, -1), v_new.index_select(0, idx).view(
            rows, n, -1)
