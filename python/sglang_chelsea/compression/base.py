"""The KV compression policy interface and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

if TYPE_CHECKING:
    from sglang_chelsea.managers.schedule_batch import Req
    from sglang_chelsea.mem_cache.host_pool import HostKVPool
    from sglang_chelsea.mem_cache.memory_pool import MHATokenToKVPool, TokenToKVPoolAllocator
    from sglang_chelsea.managers.scheduler import Scheduler
    from sglang_chelsea.server_args import ServerArgs


class KVCompressor(ABC):
    """A policy that rewrites completed radix pages of a request's KV row in place.

    Called by the scheduler between forward passes, after the pass that completed the
    pages and before they are inserted into the radix tree, so a compressed page is
    what every later prefix hit reuses.
    """

    #: True when the policy gives slots weights other than 1 (centroid sizes), so attention
    #: must add the log-weight bias; False lets the backend skip it.
    writes_slot_weights = False
    #: True when the policy wants the model's query prior (``set_query_prior``), measured
    #: by the model runner once at start.
    wants_query_prior = False

    def bind(self, pool: "MHATokenToKVPool", allocator: "TokenToKVPoolAllocator",
             host_pool: Optional["HostKVPool"] = None) -> None:
        """Called once by the model runner with the pools the policy works on."""

    def set_query_prior(self, prior: torch.Tensor) -> None:
        """Called once at start when ``wants_query_prior``: this rank's mean post-RoPE
        query ``[num_layers, num_kv_heads, head_dim]`` (``model_executor/query_prior.py``)."""

    def warm_up(self, pool: "MHATokenToKVPool", max_chunks: int) -> None:
        """Called once at start on the CPU when freed host memory stays in the heap: run
        the policy's per-step work once, on stand-in data of the size a step of
        ``max_chunks`` completed chunks gives it, so that the first long request does not
        pay for growing and faulting in the heap. Must not touch ``pool``."""

    def make_selector(self, scheduler: "Scheduler", reqs: list["Req"], decode: bool
                      ) -> Optional["SlotSelector"]:
        """For a forward pass (a decode step when ``decode``, else prefill chunks): the
        per-head slot selection (None: attend to every slot)."""
        return None

    def make_query_observer(self, scheduler: Scheduler, reqs: list[Req]
                            ) -> QueryObserver | None:
        """For an extend batch: what receives the layers' queries (None: nothing does)."""
        return None

    @abstractmethod
    def compress_reqs(self, scheduler: "Scheduler", reqs: list["Req"],
                      finishing: bool = False) -> None:
        """Compress the completed pages of ``reqs`` that are due (all of them when the
        request is finishing or being retracted); advance ``req.compressed_pages``."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counters reported under ``kv_cache`` in /get_server_info."""

    def reset(self) -> None:
        """Forget counters tied to cached pages (on flush_cache)."""


@dataclass
class Selection:
    """What each query head of one request attends to in one layer at one decode step.

    ``slots``: device-pool slots, ``[q_heads, n]`` or ``[n]`` (the same for every head).
    ``log_weight``: ``[q_heads, n]`` logit bias replacing the pool's ``log(weight)`` of
    those slots (``-inf`` drops a slot for that head); None: the pool's.
    ``host_slots`` / ``host_log_weight``: ``[q_heads, m]`` raw slots recalled from the host
    tier and their bias (0 live, ``-inf`` padding; None: all live), attended with ``slots``.
    ``host_tier``: what reads them onto the device (``gather(layer_id, kv_head, slots)``, as
    ``HostKVPool.gather``: a ``DeviceWorkingSet`` or ``HostStream``); None: the backend's
    host pool.
    ``kv_head_lists``: ``slots`` is ``[kv_heads, n]``, one list per KV head read once for
    all of its query heads, with ``log_weight [q_heads, n]`` masking each query head's
    entries (a union of the group's per-head selections).
    """

    slots: "torch.Tensor"
    log_weight: Optional["torch.Tensor"] = None
    host_slots: Optional["torch.Tensor"] = None
    host_log_weight: Optional["torch.Tensor"] = None
    host_tier: Any = None
    kv_head_lists: bool = False

    def query_head_slots(self, n_q: int) -> "torch.Tensor":
        """``slots`` as ``[q_heads, n]``, one list per query head."""
        if self.slots.dim() == 1:
            return self.slots.expand(n_q, -1)
        if self.kv_head_lists:
            return self.slots.repeat_interleave(n_q // self.slots.shape[0], dim=0)
        return self.slots


@dataclass
class BatchSelection:
    """Every request's per-query-head lists in one decode layer, on the device: row
    ``b * q_heads + h`` of ``indptr`` spans its pool slots in ``indices`` (int32), with a
    logit bias per entry in ``bias`` (float32); ``max_len`` is the longest row."""

    indptr: "torch.Tensor"
    indices: "torch.Tensor"
    bias: "torch.Tensor"
    max_len: int


class SlotSelector(ABC):
    """Per forward pass: which slots each query head of a request attends to."""

    def select_batch(self, layer_id: int, q: "torch.Tensor", kv_indices: "torch.Tensor",
                     offsets: list[int]) -> Any:
        """Optional fast lane for a decode layer: all requests' lists at once, given the
        queries ``q [B, q_heads, D]`` and the batch's flattened slot lists (``kv_indices``
        on the device, request ``i`` at ``offsets[i]:offsets[i + 1]``). Returns a
        :class:`BatchSelection`, None (no request selects in this layer: the plain lists),
        or ``NotImplemented`` (ask :meth:`select` request by request)."""
        return NotImplemented

    @abstractmethod
    def select(self, layer_id: int, i: int, q: "torch.Tensor", n_slots: int
               ) -> Optional[Selection]:
        """The selection of request ``i`` of the batch among the first ``n_slots`` slots of
        its row (decode: all, the new token's included; extend: the cached prefix), given its
        queries ``q [T, q_heads, head_dim]`` (T = 1 at decode); None: all of those slots."""


class QueryObserver(ABC):
    """Per extend pass: sees each layer's post-RoPE queries before attention (SnapKV
    scores the prompt with its last tokens' queries, which the pool does not keep)."""

    @abstractmethod
    def observe(self, layer_id: int, q: torch.Tensor, scaling: float) -> None:
        """``q [T, q_heads, head_dim]``: the whole batch's new tokens, in batch order;
        ``scaling``: the layer's softmax scale."""


def check_full_layers(flag: str, full_layers: int, num_layers: int) -> None:
    """Raise ValueError when ``flag`` (a policy's count of leading uncompressed layers) leaves
    no layer of the model to compress."""
    if full_layers >= num_layers:
        raise ValueError(f"{flag} {full_layers} leaves none of the model's {num_layers} layers "
                         f"to compress: set it below {num_layers}")


def page_slots(scheduler: "Scheduler", req: "Req", page: int) -> "torch.Tensor":
    """The slots that hold completed page ``page`` of ``req`` (int64)."""
    start = sum(req.page_lens[:page])
    row = scheduler.req_to_token_pool.req_to_token[req.req_pool_idx]
    return row[start:start + req.page_lens[page]].to(torch.int64)


def shrink_run(scheduler: Scheduler, req: Req, start: int, c: int, m: int) -> None:
    """Of the ``c`` slots at row position ``start``, keep the first ``m``, free the rest and
    close the gap in the row (``req.physical_len`` follows; ``page_lens`` is the caller's)."""
    if m >= c:
        return
    row = scheduler.req_to_token_pool.req_to_token[req.req_pool_idx]
    scheduler.allocator.free(row[start + m:start + c].to(torch.int64))
    tail = row[start + c:req.physical_len].clone()
    row[start + m:start + m + tail.numel()] = tail
    req.physical_len -= c - m


def shrink_page(scheduler: "Scheduler", req: "Req", page: int, m: int) -> None:
    """Keep the first ``m`` slots of a page, free the rest, close the gap in the row."""
    shrink_run(scheduler, req, sum(req.page_lens[:page]), req.page_lens[page], m)
    req.page_lens[page] = m


CompressorFactory = Callable[["ServerArgs"], KVCompressor]
_REGISTRY: dict[str, CompressorFactory] = {}


def register_compressor(name: str) -> Callable[[CompressorFactory], CompressorFactory]:
    """Decorator: make ``factory`` the policy for ``--kv-compression name``."""
    def wrap(factory: CompressorFactory) -> CompressorFactory:
        _REGISTRY[name] = factory
        return factory
    return wrap


def create_compressor(server_args: "ServerArgs") -> Optional[KVCompressor]:
    """The policy named by ``--kv-compression`` (None for ``none``)."""
    name = server_args.kv_compression
    if name == "none":
        return None
    # Importing the policy modules registers them.
    from sglang_chelsea.compression import (  # noqa: F401
        chelsea,
        clusterkv,
        snapkv,
        streaming,
    )

    if name not in _REGISTRY:
        raise ValueError(
            f"unknown kv_compression {name!r}; available: none, {', '.join(_REGISTRY)}")
    return _REGISTRY[name](server_args)
