"""Flattened slot lists (FlashInfer's ``indptr`` / ``indices`` layout), shared by the GPU
attention backends and the selecting KV policies."""

from __future__ import annotations

import torch


def indptr_of(lengths: list[int]) -> torch.Tensor:
    """``[len(lengths) + 1]`` int32 offsets (CPU): 0, then the running sums of ``lengths``."""
    indptr = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if lengths:
        indptr[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return indptr


def flatten_slot_lists(table: torch.Tensor, rows: list[int], lengths: list[int]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_indptr`` and ``kv_indices`` (int32, CPU) of the first ``lengths[i]`` slots of
    ``table[rows[i]]`` (one padding slot 0 when all are empty: a kernel argument is never
    an empty tensor)."""
    indptr = indptr_of(lengths)
    parts = [table[r, :n] for r, n in zip(rows, lengths) if n]
    indices = torch.cat(parts) if parts else torch.zeros(1, dtype=torch.int32)
    return indptr, indices
