"""The attention backend interface (SGLang's AttentionBackend)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch

from sglang_chelsea.model_executor.forward_batch_info import ForwardBatch

if TYPE_CHECKING:
    from sglang_chelsea.mem_cache.memory_pool import MHATokenToKVPool


class AttentionBackend(ABC):
    """Attention over the paged KV pool.

    Queries and new keys/values arrive as ``[T, heads, head_dim]`` (keys post-RoPE).
    The backend writes the new K/V into the pool at ``forward_batch.out_cache_loc`` and
    attends each request's queries to the slots listed in its ``req_to_token`` row:
    the cached prefix (with each slot's log-weight added to its logit, per KV head) and
    the new tokens causally. In extend, a KV policy's ``query_observer`` (if any) sees the
    queries first, whatever the backend.
    """

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """Prepare per-batch metadata once, before the layers run."""

    # CUDA graphs for decode (CudaGraphRunner); backends that support them override these.
    def init_cuda_graph_state(self, max_bs: int, pool: "MHATokenToKVPool",
                              max_context_len: int) -> None:
        """Allocate the static buffers the captured decode graphs read their slot lists from."""
        raise NotImplementedError(f"{type(self).__name__} does not run CUDA graphs")

    def init_forward_metadata_capture_cuda_graph(self, bs: int) -> Any:
        """Metadata for capturing a decode graph of ``bs`` requests (each listing the padding
        slot 0 only), pointing at the static buffers."""
        raise NotImplementedError(f"{type(self).__name__} does not run CUDA graphs")

    def init_forward_metadata_replay_cuda_graph(self, forward_batch: ForwardBatch,
                                                padded_bs: int) -> None:
        """Write ``forward_batch``'s slot lists into the static buffers of the graph of
        ``padded_bs`` requests (rows past the batch list the padding slot 0)."""
        raise NotImplementedError(f"{type(self).__name__} does not run CUDA graphs")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                forward_batch: ForwardBatch, scaling: float) -> torch.Tensor:
        if forward_batch.forward_mode.is_decode():
            return self.forward_decode(q, k, v, layer_id, forward_batch, scaling)
        if forward_batch.query_observer is not None:
            forward_batch.query_observer.observe(layer_id, q, scaling)
        return self.forward_extend(q, k, v, layer_id, forward_batch, scaling)

    @abstractmethod
    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                       forward_batch: ForwardBatch, scaling: float) -> torch.Tensor:
        """Prefill: returns ``[T, q_heads, head_dim]``."""

    @abstractmethod
    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                       forward_batch: ForwardBatch, scaling: float) -> torch.Tensor:
        """One token per request: returns ``[B, q_heads, head_dim]``."""
