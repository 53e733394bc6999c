"""The tensor-parallel group: which rank this process is, the all-reduce the sharded model
layers need, and the channel the rank-0 scheduler drives the other ranks through.

Every rank of one server is a process on this machine. Activations are all-reduced on the
device group (NCCL on a GPU, gloo on the CPU); commands (pickled batch descriptions) go
from rank 0 to the others over a gloo group on loopback. One group per process, as in
SGLang (``get_tp_group()``); without one (``--tp-size 1``) every helper is a no-op.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

# Idle ranks wait for rank 0's next command for as long as the server stays up.
IDLE_TIMEOUT = datetime.timedelta(days=365)


@dataclass
class TPGroup:
    """This process's place in the tensor-parallel group."""

    rank: int
    size: int
    device_group: Any  # all_reduce of activations and small device tensors
    cpu_group: Any  # commands from rank 0 (gloo)

    @property
    def is_first_rank(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduce ``x`` in place over the ranks; returns it."""
        dist.all_reduce(x, op=op, group=self.device_group)
        return x

    def all_reduce_cpu(self, x: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduce a CPU tensor in place over the ranks (gloo); returns it."""
        dist.all_reduce(x, op=op, group=self.cpu_group)
        return x

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0 sends ``obj`` (picklable); every rank returns it."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]


_TP_GROUP: Optional[TPGroup] = None


def init_tp_group(rank: int, size: int, init_port: int, device: str) -> TPGroup:
    """Join the group of ``size`` ranks rendezvousing at ``tcp://127.0.0.1:init_port``."""
    global _TP_GROUP
    if _TP_GROUP is not None:
        raise RuntimeError("the tensor-parallel group is already initialised")
    # gloo binds the interface of the host name unless told otherwise: keep it on loopback.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{init_port}",
                            world_size=size, rank=rank, timeout=IDLE_TIMEOUT)
    world = dist.group.WORLD
    cpu_group = world if backend == "gloo" else dist.new_group(backend="gloo",
                                                               timeout=IDLE_TIMEOUT)
    _TP_GROUP = TPGroup(rank, size, world, cpu_group)
    return _TP_GROUP


def get_tp_group() -> Optional[TPGroup]:
    """The group, or None when this process runs the whole model (``--tp-size 1``)."""
    return _TP_GROUP


def get_tp_rank() -> int:
    return _TP_GROUP.rank if _TP_GROUP is not None else 0


def get_tp_size() -> int:
    return _TP_GROUP.size if _TP_GROUP is not None else 1


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the ranks (identity without a group)."""
    if _TP_GROUP is None:
        return x
    return _TP_GROUP.all_reduce(x)


def destroy_tp_group() -> None:
    global _TP_GROUP
    if _TP_GROUP is not None:
        dist.destroy_process_group()
        _TP_GROUP = None


def shard_range(total: int, rank: int, size: int) -> tuple[int, int]:
    """``[start, end)`` of ``total`` items held by ``rank``: contiguous, sizes differ by at
    most one (an uneven split is allowed: SmolLM2-135M has 3 KV heads)."""
    return total * rank // size, total * (rank + 1) // size
