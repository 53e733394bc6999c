"""GrammarMatcher: one request's position in its grammar."""

from __future__ import annotations

from typing import Optional

import llguidance
import torch
from torch import Tensor


class GrammarMatcher:
    """Follows the tokens a request generates through its grammar.

    Each step: :meth:`fill_bitmask` gives the tokens allowed next, the sampler picks one of
    them, :meth:`accept_token` advances. :meth:`is_terminated` is true once the grammar
    admits no further token (it is complete, or it accepted an end-of-sequence token).
    """

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher
        self.num_accepted = 0  # equals the request's generated tokens, retractions included

    def fill_bitmask(self, bitmask: Tensor, row: int) -> None:
        """Write the allowed next tokens into row ``row`` of an int32 bitmask ``[B, W]``."""
        words = bitmask[row]
        if (bitmask.dtype != torch.int32 or bitmask.device.type != "cpu"
                or not words.is_contiguous()):
            raise ValueError("bitmask must be a contiguous int32 CPU tensor")
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def accept_token(self, token_id: int) -> bool:
        """Advance by ``token_id``; False (and :meth:`error` says why) if it is not allowed."""
        ok = self._matcher.consume_token(token_id)
        if ok:
            self.num_accepted += 1
        return ok

    def is_terminated(self) -> bool:
        return self._matcher.is_stopped()

    def error(self) -> Optional[str]:
        """The matcher's error (a rejected token, a parser limit) in one line, or None."""
        if not self._matcher.is_error():
            return None
        return self._matcher.get_error().strip().splitlines()[0]
