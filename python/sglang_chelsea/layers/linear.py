"""Linear layers sharded for tensor parallelism (SGLang's names).

A ``ColumnParallelLinear`` holds, for each of its fused output segments (q/k/v, gate/up),
a contiguous range of that segment's output rows: no communication. A
``RowParallelLinear`` holds the matching range of input columns and sums the partial
products over the ranks with an all-reduce. With one rank they are plain ``nn.Linear``.
Weights are loaded whole and cut here, so checkpoints need no conversion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglang_chelsea.distributed.parallel_state import tensor_model_parallel_all_reduce

Range = tuple[int, int]


class ColumnParallelLinear(nn.Linear):
    """Output rows ``[start, end)`` of each fused segment, concatenated."""

    def __init__(self, in_features: int, shards: list[Range], bias: bool) -> None:
        super().__init__(in_features, sum(end - start for start, end in shards), bias=bias)
        self.shards = shards

    def shard(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """This rank's slice of a full weight (or bias) given as one tensor per segment."""
        if len(parts) != len(self.shards):
            raise ValueError(f"expected {len(self.shards)} fused parts, got {len(parts)}")
        return torch.cat([p[start:end] for p, (start, end) in zip(parts, self.shards)])


class RowParallelLinear(nn.Linear):
    """Input columns ``[start, end)``; the output is all-reduced (summed) over the ranks."""

    def __init__(self, in_shard: Range, out_features: int) -> None:
        super().__init__(in_shard[1] - in_shard[0], out_features, bias=False)
        self.in_shard = in_shard

    def shard(self, weight: torch.Tensor) -> torch.Tensor:
        start, end = self.in_shard
        return weight[:, start:end]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tensor_model_parallel_all_reduce(F.linear(x, self.weight))
