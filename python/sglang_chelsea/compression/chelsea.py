"""Chelsea: merge each completed chunk's K/V into cluster centroids (Chunked Soft Matching).

A chunk is a radix page of ``chelsea_chunk_size`` tokens. When it completes, every layer
and KV head of it is matched and merged in one batched call; the centroids are written
into the first ``m`` of the chunk's own slots (``m`` = the most centroids any layer/head
kept, on any tensor-parallel rank), the other ``C - m`` slots are freed, and the request's
slot list is compacted.
Each slot's weight (per layer, KV head) is its cluster size (0 for a padding slot), and
attention adds log(weight) when the size bias is on. A centroid is the mean of its
members' K and V, each member weighted by the attention the model's query prior gives it
(``--chelsea-query-weighting``) or by its size alone (the default). With
``--chelsea-representative medoid`` a slot holds instead the one member the query prior
attends most, raw, with weight 1.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from sglang_chelsea.compression.base import (KVCompressor, SlotSelector, check_full_layers,
    page_slots, register_compressor, shrink_page)
from sglang_chelsea.compression.chelsea_recall import RecallSelector, RecallStore
from sglang_chelsea.distributed.parallel_state import get_tp_group
from sglang_chelsea.kernels.chunked_soft_matching import MergeResult, chunked_soft_matching
from sglang_chelsea.kernels.query_weighted_merge import query_medoids, query_weighted_centroids
from sglang_chelsea.mem_cache.memory_pool import head_rows

if TYPE_CHECKING:
    from sglang_chelsea.mem_cache.host_pool import HostKVPool
    from sglang_chelsea.mem_cache.memory_pool import MHATokenToKVPool, TokenToKVPoolAllocator
    from sglang_chelsea.managers.schedule_batch import Req
    from sglang_chelsea.managers.scheduler import Scheduler
    from sglang_chelsea.server_args import ServerArgs


class ChelseaCompressor(KVCompressor):
    """Online chunk clustering inside the radix-tree KV pool."""

    writes_slot_weights = True

    def __init__(self, server_args: "ServerArgs") -> None:
        self.chunk_size = server_args.chelsea_chunk_size
        self.keep_ratio = server_args.chelsea_keep_ratio
        self.round_fraction = server_args.chelsea_round_fraction
        self.min_similarity = server_args.chelsea_min_similarity
        self.sink_tokens = server_args.chelsea_sink_tokens
        self.full_layers = server_args.chelsea_full_layers
        self.size_bias = server_args.chelsea_size_bias
        self.medoids = server_args.chelsea_representative == "medoid"
        self.wants_query_prior = server_args.chelsea_query_weighting or self.medoids
        self.query_prior: Optional[torch.Tensor] = None  # [layers, kv_heads, head_dim]
        self.recent_chunks = server_args.chelsea_recent_chunks
        self.kernel = server_args.chelsea_kernel
        self.recall_budget = server_args.chelsea_recall_budget
        self.recall: Optional[RecallStore] = None
        self.clustered_chunks = 0
        self.clustered_tokens = 0
        self.kept_slots = 0
        self.cluster_time = 0.0

    def chunk_target(self, page: int) -> int:
        """Slots the chunk at ``page`` (its index in the sequence) may keep.

        The first ``p`` chunks together keep ``round(keep_ratio * p * C)`` slots, so a
        fractional ``keep_ratio * C`` is spread over the chunks (25.6 at keep 0.2, C 128:
        26, 25, 26, 25, 26, ...) and the whole sequence keeps exactly its share instead of
        rounding every chunk up. The target depends only on the chunk's position, so every
        request that shares the chunk in the radix tree gets the same one.
        """
        per_chunk = self.keep_ratio * self.chunk_size
        before = math.floor(per_chunk * page + 0.5)
        return max(1, math.floor(per_chunk * (page + 1) + 0.5) - before)

    def bind(self, pool: "MHATokenToKVPool", allocator: "TokenToKVPoolAllocator",
             host_pool: Optional["HostKVPool"] = None) -> None:
        check_full_layers("--chelsea-full-layers", self.full_layers, pool.num_layers)
        if self.recall_budget > 0:
            if host_pool is None:
                raise ValueError("chelsea recall needs a host KV pool")
            self.recall = RecallStore(pool, host_pool, self.full_layers)
            allocator.free_listeners.append(self.recall.on_free)

    def set_query_prior(self, prior: torch.Tensor) -> None:
        self.query_prior = prior

    def warm_up(self, pool: "MHATokenToKVPool", max_chunks: int) -> None:
        # The matcher's input for max_chunks chunks, as cluster() lays it out: one
        # single-head problem per (layer, KV head, chunk), random keys (they merge in about
        # as many rounds as real ones do to reach the targets).
        c = self.chunk_size
        problems = (pool.num_layers - self.full_layers) * pool.num_kv_heads * max_chunks
        if problems <= 0:
            return
        gen = torch.Generator().manual_seed(0)
        shape = (problems, 1, c, pool.head_dim)
        keys = torch.randn(shape, generator=gen, dtype=torch.float32).to(pool.dtype)
        values = torch.randn(shape, generator=gen, dtype=torch.float32).to(pool.dtype)
        chunked_soft_matching(keys, values, target=self.chunk_target(0),
                              round_fraction=self.round_fraction, min_similarity=-1.0)

    def make_selector(self, scheduler: "Scheduler", reqs: list["Req"], decode: bool
                      ) -> Optional[SlotSelector]:
        if self.recall is None:
            return None
        selector = RecallSelector(self.recall, self.recall_budget, self.full_layers, scheduler,
                                  reqs)
        # No request has a compressed chunk to recall from: plain attention (and, on a GPU,
        # a decode step that CUDA graphs can replay).
        return None if all(index is None for index in selector.indexes) else selector

    def compress_reqs(self, scheduler: "Scheduler", reqs: list["Req"],
                      finishing: bool = False) -> None:
        jobs: list[tuple["Req", int]] = []  # (request, page index)
        for req in reqs:
            # The newest `recent_chunks` completed chunks stay raw until later ones complete.
            due = len(req.page_lens) - (0 if finishing else self.recent_chunks)
            for page in range(req.compressed_pages, due):
                jobs.append((req, page))
        if not jobs:
            return
        on_gpu = scheduler.token_to_kv_pool.k_buffer[0].is_cuda
        if on_gpu:  # the forward pass may still be running: time clustering alone
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self._compress(scheduler, jobs)
        if on_gpu:
            torch.cuda.synchronize()
        self.cluster_time += time.perf_counter() - t0

    def _compress(self, scheduler: "Scheduler", jobs: list[tuple["Req", int]]) -> None:
        c = self.chunk_size
        for req, page in jobs:
            assert req.page_lens[page] == c, "only raw pages are compressed"
        slots = torch.stack([page_slots(scheduler, req, page) for req, page in jobs])  # [N, C]
        protected = torch.zeros(slots.shape, dtype=torch.bool)
        for i, (_, page) in enumerate(jobs):
            first = page * c
            if first < self.sink_tokens:
                protected[i, : self.sink_tokens - first] = True
        targets = torch.tensor([self.chunk_target(page) for _, page in jobs])
        # On every tensor-parallel rank (each over its own KV heads).
        kept = scheduler.model_runner.cluster_chunks(slots, protected, targets)
        for i, (req, page) in enumerate(jobs):
            m = int(kept[i])
            shrink_page(scheduler, req, page, m)
            self.clustered_chunks += 1
            self.clustered_tokens += c
            self.kept_slots += m
        for req, page in jobs:
            req.compressed_pages = max(req.compressed_pages, page + 1)

    def cluster(self, pool: "MHATokenToKVPool", slots: torch.Tensor,
                protected: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Merge the chunks held in ``slots`` ``[N, C]`` (``protected`` ``[N, C]``: tokens
        that never merge; ``targets`` ``[N]``: the most slots each may keep) for every
        compressed layer and KV head of ``pool``; write the centroids into each chunk's
        first slots and return how many slots each chunk keeps.

        The kept count is the most centroids any layer/head needs, over all
        tensor-parallel ranks (each clusters its own heads), so that the slot schedule the
        rank-0 scheduler applies is valid on every rank.
        """
        c = self.chunk_size
        n_chunks = slots.shape[0]
        layers = range(self.full_layers, pool.num_layers)
        device = pool.k_buffer[0].device
        flat = slots.reshape(-1).to(device)
        n_layers = len(layers)
        h, d = pool.num_kv_heads, pool.head_dim
        # Each layer's rows gathered straight from the head-major pool ([H, N * C, D]): the
        # matcher sees every (layer, head, chunk) as a chunk of one head, [L * H * N, 1, C, D]
        # (its problems are independent), so no transposing copy is needed.
        keys = torch.empty(n_layers, h, n_chunks * c, d, dtype=pool.dtype, device=device)
        values = torch.empty_like(keys)
        rows = head_rows(torch.arange(h, device=device), flat[None, :],
                         pool.size + 1)  # [H * N * C] rows of the [H * slots, D] views
        for j, layer in enumerate(layers):
            torch.index_select(pool.k_buffer[layer].view(-1, d), 0, rows, out=keys[j].view(-1, d))
            torch.index_select(pool.v_buffer[layer].view(-1, d), 0, rows, out=values[j].view(-1, d))
        keys, values = keys.view(-1, 1, c, d), values.view(-1, 1, c, d)
        match = chunked_soft_matching
        if self.kernel == "triton":
            from sglang_chelsea.kernels.chunked_soft_matching_triton import (
                chunked_soft_matching_triton as match)
        result = match(
            keys, values, target=targets.to(device).repeat(n_layers * h),
            round_fraction=self.round_fraction, min_similarity=self.min_similarity,
            protected=protected.to(device).repeat(n_layers * h, 1))
        if self.query_prior is not None:
            # Each slot from the attention the model's typical query gives each member: the
            # member it attends most (medoids) or the members weighted by it.
            prior = self.query_prior[self.full_layers:].to(device)  # [L, H, D]
            prior = prior[:, :, None].expand(n_layers, h, n_chunks, d).reshape(-1, d)
            args = (keys.view(-1, c, d), values.view(-1, c, d), result.assignment.view(-1, c),
                    result.keys.shape[2], prior)
            new_keys, new_values = (query_medoids(*args) if self.medoids
                                    else query_weighted_centroids(*args, d ** -0.5))
            result.keys, result.values = new_keys.view_as(result.keys), new_values.view_as(
                result.values)
        # Slots kept per chunk: the most centroids any compressed layer/head needs (all C
        # when some layers stay raw).
        kept = result.num_kept.view(n_layers, h, n_chunks).amax(dim=(0, 1))  # [N]
        if self.full_layers:
            kept = torch.full_like(kept, c)
        tp_group = get_tp_group()
        if tp_group is not None:
            tp_group.all_reduce(kept, dist.ReduceOp.MAX)
        kept = kept.cpu()
        if self.recall is not None:  # raw chunks to the host tier before centroids overwrite them
            self.recall.add(slots.cpu(), kept,
                            result.assignment.view(n_layers, h, n_chunks, c).transpose(1, 2))
        self._write_centroids(pool, layers, slots.cpu(), kept, result)
        return kept

    def _write_centroids(self, pool: "MHATokenToKVPool", layers: range, slots: torch.Tensor,
                         kept: torch.Tensor, result: "MergeResult") -> None:
        """Write each chunk's centroids into the first of its ``kept`` slots, one scatter
        per layer; kept slots past a compressed layer's centroids get weight 0 (padding),
        and the raw layers' kept slots weight 1. Medoids, and every slot when the size bias
        is off, weigh 1."""
        n_chunks, c = slots.shape
        h, d = pool.num_kv_heads, pool.head_dim
        n_layers = len(layers)
        m_max = result.keys.shape[2]
        device = pool.k_buffer[0].device
        pos = torch.arange(c)
        valid = pos[None, :m_max] < kept[:, None]  # [N, m_max]: centroid slots
        pad = (pos[None, :] >= m_max) & (pos[None, :] < kept[:, None])  # [N, C]
        n_idx, m_idx = valid.nonzero(as_tuple=True)
        dst = slots[n_idx, m_idx].to(device)
        pad_dst = slots[pad].to(device)
        n_idx, m_idx = n_idx.to(device), m_idx.to(device)
        # Per layer [H, N, m_max, ...]; [:, n_idx, m_idx] picks the centroid rows: [H, rows, ...].
        out_k = result.keys.view(n_layers, h, n_chunks, m_max, d)
        out_v = result.values.view(n_layers, h, n_chunks, m_max, -1)
        out_w = result.sizes.view(n_layers, h, n_chunks, m_max)
        if self.medoids or not self.size_bias:
            out_w = (out_w > 0).to(out_w.dtype)
        for j, layer in enumerate(layers):
            pool.k_buffer[layer][:, dst] = out_k[j][:, n_idx, m_idx].to(pool.dtype)
            pool.v_buffer[layer][:, dst] = out_v[j][:, n_idx, m_idx].to(pool.dtype)
            pool.weight_buffer[layer][:, dst] = out_w[j][:, n_idx, m_idx]
            if pad_dst.numel():
                pool.weight_buffer[layer][:, pad_dst] = 0.0
        kept_slots = slots[pos[None, :] < kept[:, None]].to(device)
        for layer in range(self.full_layers):
            pool.weight_buffer[layer][:, kept_slots] = 1.0

    def stats(self) -> dict[str, Any]:
        out = {
            "clustered_chunks": self.clustered_chunks,
            "clustered_tokens": self.clustered_tokens,
            "centroid_slots": self.kept_slots,
            "clustering_seconds": round(self.cluster_time, 4),
        }
        if self.recall is not None:
            out.update({"host_slots": self.recall.host.used_slots(),
                        "host_total_slots": self.recall.host.size,
                        "unrecallable_chunks": self.recall.unrecallable_chunks,
                        "recall_budget": self.recall_budget})
        return out

    def reset(self) -> None:
        if self.recall is not None:
            self.recall.clear()
        self.clustered_chunks = self.clustered_tokens = self.kept_slots = 0
        self.cluster_time = 0.0


@register_compressor("chelsea")
def _make_chelsea(server_args: "ServerArgs") -> KVCompressor:
    return ChelseaCompressor(server_args)
