"""Logit penalties over generated tokens, and the min_new_tokens stop-token mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sglang_chelsea.sampling.sampling_params import SamplingParams


def token_counts(output_ids: Sequence[Sequence[int]], vocab_size: int) -> Tensor:
    """How often each token occurs in each row's ``output_ids``: float32 ``[B, vocab_size]``."""
    counts = torch.zeros(len(output_ids), vocab_size, dtype=torch.float32)
    lengths = torch.tensor([len(ids) for ids in output_ids], dtype=torch.long)
    if int(lengths.sum()) == 0:
        return counts
    rows = torch.repeat_interleave(torch.arange(len(output_ids)), lengths)
    cols = torch.tensor([t for ids in output_ids for t in ids], dtype=torch.long)
    counts.index_put_((rows, cols), torch.ones_like(cols, dtype=torch.float32), accumulate=True)
    return counts


def apply_penalties(
    logits: Tensor,
    counts: Tensor,
    frequency_penalties: Tensor,
    presence_penalties: Tensor,
    repetition_penalties: Tensor,
) -> Tensor:
    """Penalise ``logits [B, V]`` in place for the tokens counted in ``counts [B, V]``.

    OpenAI semantics: ``logit -= frequency * count + presence * (count > 0)``. Repetition
    (CTRL) penalty on seen tokens: positive logits are divided by it, negative ones
    multiplied. The penalties are ``[B]`` tensors; 0, 0 and 1 mean none.
    """
    seen = counts > 0
    logits -= frequency_penalties.unsqueeze(1) * counts
    logits -= presence_penalties.unsqueeze(1) * seen
    rep = repetition_penalties.unsqueeze(1).expand_as(logits)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits.copy_(torch.where(seen, penalised, logits))
    return logits


def apply_min_new_tokens_mask(
    logits: Tensor, rows: Sequence[int], banned_ids: Sequence[Sequence[int]]
) -> Tensor:
    """Set ``logits[rows[i], banned_ids[i]]`` to ``-inf`` in place; returns ``logits``."""
    if len(rows) != len(banned_ids):
        raise ValueError("rows and banned_ids must have the same length")
    lengths = torch.tensor([len(ids) for ids in banned_ids], dtype=torch.long)
    if len(rows) == 0 or int(lengths.sum()) == 0:
        return logits
    row_idx = torch.repeat_interleave(torch.tensor(list(rows), dtype=torch.long), lengths)
    col_idx = torch.tensor([t for ids in banned_ids for t in ids], dtype=torch.long)
    logits[row_idx, col_idx] = float("-inf")
    return logits


def min_new_tokens_banned_ids(
    params: SamplingParams, num_generated: int, eos_token_ids: Sequence[int]
) -> list[int]:
    """The ids a request may not produce yet: EOS and its ``stop_token_ids`` while fewer
    than ``min_new_tokens`` tokens were generated (as SGLang's min-new-tokens penalizer);
    empty once the minimum is reached."""
    if num_generated >= params.min_new_tokens:
        return []
    return list(dict.fromkeys([*eos_token_ids, *(params.stop_token_ids or [])]))
