"""ForwardBatch: the tensors one model forward pass needs (SGLang's names)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from sglang_chelsea.compression.base import QueryObserver, SlotSelector
    from sglang_chelsea.attention.base_backend import AttentionBackend
    from sglang_chelsea.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool


class ForwardMode(enum.Enum):
    EXTEND = enum.auto()  # prefill (possibly a chunk of it, possibly after a cached prefix)
    DECODE = enum.auto()  # one new token per request

    def is_extend(self) -> bool:
        return self is ForwardMode.EXTEND

    def is_decode(self) -> bool:
        return self is ForwardMode.DECODE


@dataclass
class ForwardBatch:
    """Inputs of one forward pass.

    Lengths are physical (KV slots) unless named ``logical``: ``positions`` are logical
    token positions (RoPE), while ``extend_prefix_lens`` / ``seq_lens`` count the slots each
    request attends to in ``req_to_token``.
    """

    forward_mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] logical positions
    out_cache_loc: torch.Tensor  # [T] KV slots the new tokens are written to
    req_pool_indices: list[int]
    seq_lens: list[int]  # physical KV length per request after this pass
    extend_prefix_lens: list[int]  # physical cached prefix per request (extend)
    extend_seq_lens: list[int]  # new tokens per request (1 for decode)
    req_to_token_pool: "ReqToTokenPool"
    token_to_kv_pool: "MHATokenToKVPool"
    attn_backend: "AttentionBackend"
    # Rows of the final hidden states whose logits are needed (indices into [T]).
    logits_rows: Optional[torch.Tensor] = None
    # Filled by the model: rotary cos/sin for ``positions``; filled by the backend: metadata.
    rope_cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    attn_metadata: Any = None
    # Decode with a selecting KV policy (ClusterKV): per-head slot lists per request.
    slot_selector: Optional["SlotSelector"] = None
    # Extend with a policy that scores with queries (SnapKV): sees each layer's queries.
    query_observer: QueryObserver | None = None
    extras: dict = field(default_factory=dict)

    def to(self, device: torch.device) -> None:
        """Move the per-token index tensors to the model's device (no-op when already there)."""
        if self.input_ids.device == device:
            return
        self.input_ids = self.input_ids.to(device, non_blocking=True)
        self.positions = self.positions.to(device, non_blocking=True)
        self.out_cache_loc = self.out_cache_loc.to(device, non_blocking=True)
        if self.logits_rows is not None:
            self.logits_rows = self.logits_rows.to(device, non_blocking=True)
