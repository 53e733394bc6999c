"""Token bitmasks: int32 words, bit ``j`` of word ``w`` set when token ``32 * w + j`` is allowed
(the layout llguidance fills), and their expansion into a bool mask over the vocabulary."""

from __future__ import annotations

import torch
from torch import Tensor

_BIT_POSITIONS = torch.arange(32, dtype=torch.int32)


def allocate_bitmask(batch_size: int, vocab_size: int) -> Tensor:
    """An all-allowed bitmask ``[batch_size, ceil(vocab_size / 32)]`` (int32, all bits set)."""
    return torch.full((batch_size, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def bitmask_to_allowed(bitmask: Tensor, vocab_size: int) -> Tensor:
    """The bool mask ``[B, vocab_size]`` of allowed tokens of ``bitmask [B, W]``."""
    bits = (bitmask.unsqueeze(-1) >> _BIT_POSITIONS) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()
