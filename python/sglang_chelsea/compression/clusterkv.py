"""ClusterKV: recallable compression by semantic clusters of keys (seed 002).

Every token's KV stays in the pool. Completed windows of ``--clusterkv-window`` tokens
(whole radix pages, aligned to the sequence start; prompt and generated tokens alike) are
clustered per layer and KV head by cosine k-means on their post-RoPE keys, about one
cluster per ``--clusterkv-tokens-per-cluster`` tokens; the first ``--clusterkv-sink-tokens``
tokens are never clustered. At each decode step every query head scores its KV head's
centroids by ``q . centroid`` and attends to: the sinks, the tokens of its best clusters up
to ``--clusterkv-budget`` tokens, and the not-yet-clustered tail (the recent window,
including the new token). The first ``--clusterkv-full-layers`` layers attend to everything.
``--clusterkv-kernel triton`` runs the k-means and the per-head selection as Triton kernels
(``kernels/kmeans_triton.py``, ``kernels/cluster_select_triton.py``; same results as the
torch references).

A window's index belongs to the slots it was built from: it is kept in a table keyed by
its first slot, so a request whose radix hit covers the window reuses it instead of
clustering again; it is dropped as soon as any of its slots is freed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from sglang_chelsea.compression.base import (KVCompressor, Selection, SlotSelector,
                                             register_compressor)
from sglang_chelsea.kernels.cluster_select import select_cluster_tokens
from sglang_chelsea.kernels.kmeans import cosine_kmeans

if TYPE_CHECKING:
    from sglang_chelsea.managers.schedule_batch import Req
    from sglang_chelsea.managers.scheduler import Scheduler
    from sglang_chelsea.mem_cache.host_pool import HostKVPool
    from sglang_chelsea.mem_cache.memory_pool import MHATokenToKVPool, TokenToKVPoolAllocator
    from sglang_chelsea.server_args import ServerArgs


@dataclass
class WindowIndex:
    """The clusters of one window: its clustered slots, centroids and labels per layer."""

    slots: torch.Tensor  # [n] int64
    centroids: torch.Tensor  # [L', kv_heads, k, D] float32 (L' = clustered layers)
    labels: torch.Tensor  # [L', kv_heads, n] int64, local cluster ids


@dataclass
class ReqIndex:
    """A request's windows, concatenated for selection."""

    window_ids: list[int] = field(default_factory=list)
    end: int = 0  # row position where the clustered part ends
    slots: Optional[torch.Tensor] = None  # [n] clustered slots, in row order
    centroids: Optional[torch.Tensor] = None  # [L', kv_heads, K, D]
    labels: Optional[torch.Tensor] = None  # [L', kv_heads, n], global cluster ids
    # Triton selection only: cluster sizes [L', kv_heads, K] and each token's index in its
    # cluster [L', kv_heads, n] (query-independent, so computed once per concatenation).
    members: tuple[torch.Tensor, torch.Tensor] | None = None


class ClusterKVPolicy(KVCompressor):
    """Cluster completed windows; select per query head at decode."""

    def __init__(self, server_args: "ServerArgs") -> None:
        self.page = server_args.effective_page_size
        self.window = server_args.clusterkv_window
        self.tokens_per_cluster = server_args.clusterkv_tokens_per_cluster
        self.budget = server_args.clusterkv_budget
        self.sink_tokens = server_args.clusterkv_sink_tokens
        self.full_layers = server_args.clusterkv_full_layers
        self.iters = server_args.clusterkv_kmeans_iters
        self.triton = server_args.clusterkv_kernel == "triton"
        self.kmeans = cosine_kmeans
        self.select_tokens = select_cluster_tokens
        if self.triton:
            from sglang_chelsea.kernels.cluster_select_triton import select_cluster_tokens_triton
            from sglang_chelsea.kernels.kmeans_triton import cosine_kmeans_triton
            self.kmeans = cosine_kmeans_triton
            self.select_tokens = select_cluster_tokens_triton
        self.windows: dict[int, WindowIndex] = {}
        self.next_id = 0
        self.pool: Optional["MHATokenToKVPool"] = None
        self.window_of_slot: Optional[torch.Tensor] = None
        self.reset()

    # ------------------------------------------------------------------ lifetime
    def bind(self, pool: "MHATokenToKVPool", allocator: "TokenToKVPoolAllocator",
             host_pool: Optional["HostKVPool"] = None) -> None:
        self.pool = pool
        self.window_of_slot = torch.full((pool.size + 1,), -1, dtype=torch.int64)
        allocator.free_listeners.append(self._on_free)

    def _on_free(self, slots: torch.Tensor) -> None:
        """Drop every window index that used a freed slot."""
        assert self.window_of_slot is not None
        ids = self.window_of_slot[slots]
        for wid in torch.unique(ids[ids >= 0]).tolist():
            index = self.windows.pop(wid)
            self.window_of_slot[index.slots] = -1

    def reset(self) -> None:
        """On flush_cache: every slot is free again, so every window index goes."""
        self.windows.clear()
        if self.window_of_slot is not None:
            self.window_of_slot.fill_(-1)
        self.clustered_windows = 0
        self.reused_windows = 0
        self.cluster_time = 0.0
        self.select_time = 0.0
        self.selected_tokens = 0
        self.candidate_tokens = 0

    def stats(self) -> dict[str, Any]:
        return {
            "clustered_windows": self.clustered_windows,
            "reused_windows": self.reused_windows,
            "indexed_windows": len(self.windows),
            "clustering_seconds": round(self.cluster_time, 4),
            "selection_seconds": round(self.select_time, 4),
            # Attended share of the clustered tokens over all decode selections so far.
            "selected_share": round(self.selected_tokens / max(1, self.candidate_tokens), 4),
        }

    # ------------------------------------------------------------------ clustering
    def compress_reqs(self, scheduler: "Scheduler", reqs: list["Req"],
                      finishing: bool = False) -> None:
        pages_per_window = self.window // self.page
        jobs: list[tuple["Req", int, torch.Tensor]] = []
        for req in reqs:
            req.compressed_pages = len(req.page_lens)  # pages are never rewritten
            state: ReqIndex = req.kv_policy_state or ReqIndex()
            req.kv_policy_state = state
            row = scheduler.req_to_token_pool.req_to_token[req.req_pool_idx]
            for w in range(len(state.window_ids), len(req.page_lens) // pages_per_window):
                start = max(w * self.window, self.sink_tokens)
                slots = row[start:(w + 1) * self.window].to(torch.int64)
                jobs.append((req, w, slots))
        if not jobs:
            return
        t0 = time.perf_counter()
        built = self._build([slots for _, _, slots in jobs])
        for (req, w, _), wid in zip(jobs, built):
            state = req.kv_policy_state
            assert len(state.window_ids) == w
            state.window_ids.append(wid)
            state.end = (w + 1) * self.window
        for req in {id(r): r for r, _, _ in jobs}.values():
            self._concat(req.kv_policy_state)
        self.cluster_time += time.perf_counter() - t0

    def _build(self, slot_lists: list[torch.Tensor]) -> list[int]:
        """Window ids for ``slot_lists``: reused when indexed already, else clustered
        (windows of equal length in one batched k-means)."""
        assert self.pool is not None and self.window_of_slot is not None
        ids: list[Optional[int]] = []
        todo: dict[int, list[int]] = {}  # length -> positions in slot_lists
        for pos, slots in enumerate(slot_lists):
            wid = int(self.window_of_slot[slots[0]])
            if wid >= 0 and torch.equal(self.windows[wid].slots, slots):
                self.reused_windows += 1
                ids.append(wid)
            else:
                ids.append(None)
                todo.setdefault(slots.numel(), []).append(pos)
        pool = self.pool
        layers = range(self.full_layers, pool.num_layers)
        for n, positions in todo.items():
            flat = torch.cat([slot_lists[p] for p in positions]).to(pool.k_buffer[0].device)
            keys = torch.stack([pool.k_buffer[l].index_select(1, flat) for l in layers])
            n_l, n_h, n_w = len(layers), pool.num_kv_heads, len(positions)
            keys = keys.view(n_l, n_h, n_w, n, -1).transpose(1, 2)  # [L', W, H, n, D]
            k = max(1, min(n, round(n / self.tokens_per_cluster)))
            res = self.kmeans(keys.reshape(-1, n, keys.shape[-1]), k, self.iters)
            cents = res.centroids.view(n_l, n_w, n_h, k, -1)
            labels = res.labels.view(n_l, n_w, n_h, n)
            for j, p in enumerate(positions):
                wid = self.next_id
                self.next_id += 1
                self.windows[wid] = WindowIndex(slot_lists[p], cents[:, j].contiguous(),
                                                labels[:, j].contiguous())
                self.window_of_slot[slot_lists[p]] = wid
                self.clustered_windows += 1
                ids[p] = wid
        return [int(i) for i in ids]  # type: ignore[arg-type]

    def _concat(self, state: ReqIndex) -> None:
        """Concatenate a request's windows (cluster ids offset per window)."""
        windows = [self.windows[w] for w in state.window_ids]
        offsets, total = [], 0
        for w in windows:
            offsets.append(total)
            total += w.centroids.shape[2]
        state.slots = torch.cat([w.slots for w in windows])
        state.centroids = torch.cat([w.centroids for w in windows], dim=2)
        state.labels = torch.cat([w.labels + off for w, off in zip(windows, offsets)], dim=2)
        if self.triton:
            from sglang_chelsea.kernels.cluster_select_triton import cluster_members
            state.members = cluster_members(state.labels, total)

    # ------------------------------------------------------------------ selection
    def make_selector(self, scheduler: "Scheduler", reqs: list["Req"]) -> Optional[SlotSelector]:
        if not any(isinstance(r.kv_policy_state, ReqIndex) and r.kv_policy_state.slots is not None
                   for r in reqs):
            return None
        return ClusterKVSelector(self, scheduler, reqs)


class ClusterKVSelector(SlotSelector):
    """Sinks + the best clusters within the budget + the unclustered tail, per query head."""

    def __init__(self, policy: ClusterKVPolicy, scheduler: "Scheduler", reqs: list["Req"]) -> None:
        self.policy = policy
        self.reqs = reqs
        self.table = scheduler.req_to_token_pool.req_to_token
        self.device = scheduler.token_to_kv_pool.k_buffer[0].device

    def select(self, layer_id: int, i: int, q: torch.Tensor, n_slots: int
               ) -> Optional[Selection]:
        policy = self.policy
        req = self.reqs[i]
        state: Optional[ReqIndex] = req.kv_policy_state
        if (q.shape[0] != 1 or layer_id < policy.full_layers or state is None
                or state.slots is None):
            return None  # prefill attends to everything; so do the first layers
        n = state.slots.numel()
        if policy.budget >= n:
            return None  # everything fits the budget: plain full attention
        t0 = time.perf_counter()
        layer = layer_id - policy.full_layers
        q = q[0]
        if state.members is not None:
            sizes, within = state.members
            pos = policy.select_tokens(q, state.centroids[layer], state.labels[layer],
                                       policy.budget, (sizes[layer], within[layer]))
        else:
            pos = policy.select_tokens(q, state.centroids[layer], state.labels[layer],
                                       policy.budget)
        row = self.table[req.req_pool_idx]
        n_q = q.shape[0]
        fixed = torch.cat([row[:policy.sink_tokens], row[state.end:n_slots]]).to(torch.int64)
        slots = torch.cat([fixed.expand(n_q, -1), state.slots[pos]], dim=1)
        policy.selected_tokens += pos.numel()
        policy.candidate_tokens += n * n_q
        policy.select_time += time.perf_counter() - t0
        return Selection(slots.to(self.device))


@register_compressor("clusterkv")
def _make_clusterkv(server_args: "ServerArgs") -> KVCompressor:
    return ClusterKVPolicy(server_args)
