"""Top-k, top-p and min-p filtering of probabilities, and the inverse-CDF draw.

All functions keep the vocabulary order. A row whose filters are off (top_k == vocab,
top_p == 1, min_p == 0) comes out bit-identical, and each row's result depends only on that
row, so a seeded request samples the same tokens whatever batch it is in.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Top-k/top-p first look at this many best tokens per row; a row whose cut falls beyond
# them (top_p close to 1 on a flat distribution, or top_k larger) falls back to a full sort.
TOP_CANDIDATES = 1024


def filter_probs(probs: Tensor, top_ks: Tensor, top_ps: Tensor, min_ps: Tensor) -> Tensor:
    """``probs [B, V]`` with the tokens that top-k, top-p or min-p exclude set to 0.

    ``top_ks [B]`` int64 (``>= V``: off), ``top_ps [B]`` (1: off), ``min_ps [B]`` (0: off).
    Top-p keeps the best tokens while the mass before them is ``<= top_p`` (at least one);
    min-p keeps tokens with ``prob >= min_p * max prob``.
    """
    keep = top_k_top_p_keep(probs, top_ks, top_ps)
    if bool((min_ps > 0).any()):
        keep &= probs >= probs.amax(dim=-1, keepdim=True) * min_ps.unsqueeze(1)
    return probs.masked_fill(~keep, 0.0)


def top_k_top_p_keep(probs: Tensor, top_ks: Tensor, top_ps: Tensor) -> Tensor:
    """The bool mask ``[B, V]`` of tokens that top-k and top-p keep."""
    vocab = probs.shape[1]
    keep = torch.ones_like(probs, dtype=torch.bool)
    filtered = (top_ks < vocab) | (top_ps < 1.0)
    if not bool(filtered.any()):
        return keep
    k = min(vocab, TOP_CANDIDATES)
    values, order = probs.topk(k, dim=-1)
    mass = values.cumsum(dim=-1)[:, -1]
    cut_inside = (top_ks <= k) | ((top_ps < 1.0) & (mass > top_ps))
    fast = filtered & cut_inside
    if bool(fast.any()):
        rows_keep = _ranked_keep(values[fast], top_ks[fast], top_ps[fast])
        keep[fast] = torch.zeros_like(keep[fast]).scatter(1, order[fast], rows_keep)
    slow = filtered & ~cut_inside
    if bool(slow.any()):
        values, order = probs[slow].sort(dim=-1, descending=True, stable=True)
        rows_keep = _ranked_keep(values, top_ks[slow], top_ps[slow])
        keep[slow] = torch.zeros_like(keep[slow]).scatter(1, order, rows_keep)
    return keep


def _ranked_keep(sorted_probs: Tensor, top_ks: Tensor, top_ps: Tensor) -> Tensor:
    """Keep mask over probabilities sorted best first: rank < top_k and mass before <= top_p."""
    ranks = torch.arange(sorted_probs.shape[1]).unsqueeze(0)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    top_p = top_ps.unsqueeze(1)
    return (ranks < top_ks.unsqueeze(1)) & ((mass_before <= top_p) | (top_p >= 1.0))


def sample_inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """Per row of ``probs [B, V]`` (unnormalised, >= 0), the first token whose cumulative
    probability exceeds ``u * total`` for ``u [B]`` uniform in [0, 1): int64 ``[B]``."""
    cdf = probs.double().cumsum(dim=-1)
    targets = (u.double() * cdf[:, -1]).unsqueeze(1)
    index = torch.searchsorted(cdf, targets, right=True).squeeze(1)
    positions = torch.arange(probs.shape[1]).unsqueeze(0)
    last_kept = torch.where(probs > 0, positions, 0).amax(dim=-1)
    return torch.minimum(index, last_kept)
