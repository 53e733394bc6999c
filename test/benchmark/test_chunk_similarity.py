"""chunk_similarity.py's profile: slots left per (layer, head) at a similarity floor."""

from __future__ import annotations

import torch
from chunk_similarity import floor_profile


def test_profile_counts_slots_left_per_problem() -> None:
    c, d = 8, 8
    same = torch.ones(1, 1, c, d)  # one problem of identical keys: merges to 1 slot
    distinct = torch.eye(c, d)[None, None]  # orthogonal keys: cosine 0 < floor, none merge
    keys = torch.cat([same, distinct])
    values = torch.randn(2, 1, c, d)
    protected = torch.zeros(2, c, dtype=torch.bool)
    (mean, p90, top), (mean_low, _, top_low) = floor_profile(
        keys, values, protected, round_fraction=0.5, floors=[0.5, -1.0])
    assert (mean, top) == ((1 + c) / 2, c)
    assert 1 <= p90 <= c
    # With no floor (-1) the orthogonal keys merge too, down to the target of 1.
    assert (mean_low, top_low) == (1.0, 1.0)
