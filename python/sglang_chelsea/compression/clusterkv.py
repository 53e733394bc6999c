"""ClusterKV: recallable compression by semantic clusters of keys (seed 002).

Every token's KV is kept. Completed windows of ``--clusterkv-window`` tokens (whole radix
pages, aligned to the sequence start; prompt and generated tokens alike) are clustered per
layer and KV head by cosine k-means on their post-RoPE keys, about one cluster per
``--clusterkv-tokens-per-cluster`` tokens; the first ``--clusterkv-sink-tokens`` tokens are
never clustered. At each decode step every query head scores its KV head's centroids by
``q . centroid`` and attends to: the sinks, the tokens of its best clusters up to
``--clusterkv-budget`` tokens, and the not-yet-clustered tail (the recent window,
including the new token). The first ``--clusterkv-full-layers`` layers attend to everything.
``--clusterkv-kernel triton`` runs the k-means and the per-head selection as Triton kernels
(``kernels/kmeans_triton.py``, ``kernels/cluster_select_triton.py``; same results as the
torch references).

A window's index belongs to the device slots it was built from: it is kept in a table
keyed by its first slot, so a request whose radix hit covers the window reuses it instead
of clustering again; it is dropped as soon as any of its slots is freed.

With ``--kv-offload`` (a radix page is then one window), a clustered window's raw K/V (every
layer) moves to the host tier and its device slots are freed but one, the window's
*handle*: its radix value and the key of its index (attention never reads it). The device
keeps the sinks, the handles, the unclustered tail and the cluster index; attention reads
the window tokens it selects from the host tier: at decode through the request's
:class:`DeviceWorkingSet` (the rows its last step attended stay on the device, only the
changed ones are copied in), in prefill chunks (which attend to everything) streamed. See
docs/design.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from sglang_chelsea.compression.base import (KVCompressor, Selection, SlotSelector,
                                             check_full_layers, register_compressor,
                                             shrink_page)
from sglang_chelsea.compression.clusterkv_batch import (BatchIndex, BatchPlan,
                                                        build_batch_index, plan_batch,
                                                        select_batch)
from sglang_chelsea.kernels.cluster_select import (cluster_members, cluster_token_mask,
                                                  kv_head_union, select_cluster_tokens)
from sglang_chelsea.kernels.kmeans import cosine_kmeans
from sglang_chelsea.mem_cache.host_pool import (DeviceWorkingSet, HostReader, HostStream,
                                               TransferStats)
from sglang_chelsea.mem_cache.memory_pool import kv_bytes_per_slot

if TYPE_CHECKING:
    from sglang_chelsea.managers.schedule_batch import Req
    from sglang_chelsea.managers.scheduler import Scheduler
    from sglang_chelsea.mem_cache.host_pool import HostKVPool
    from sglang_chelsea.mem_cache.memory_pool import MHATokenToKVPool, TokenToKVPoolAllocator
    from sglang_chelsea.server_args import ServerArgs


@dataclass
class WindowIndex:
    """The clusters of one window: its clustered tokens, centroids and labels per layer."""

    key: torch.Tensor  # [k] int64 device slots identifying it in a row: its raw slots, or
    # its handle slot once offloaded
    slots: torch.Tensor  # [n] int64 the clustered tokens: device slots, or host slots
    centroids: torch.Tensor  # [L', kv_heads, k, D] float32 (L' = clustered layers)
    labels: torch.Tensor  # [L', kv_heads, n] int64, local cluster ids
    on_host: bool = False

    def index_bytes(self) -> int:
        return (self.centroids.numel() * self.centroids.element_size()
                + self.labels.numel() * self.labels.element_size())


@dataclass
class ReqIndex:
    """A request's windows, concatenated for selection."""

    window_ids: list[int] = field(default_factory=list)
    end: int = 0  # row position where the clustered part ends (the unclustered tail starts)
    key_pos: torch.Tensor | None = None  # [W] row position of each window's first key slot
    key_slots: torch.Tensor | None = None  # [W] those slots when the index was built
    slots: torch.Tensor | None = None  # [n] clustered tokens' slots, in row order
    centroids: torch.Tensor | None = None  # [L', kv_heads, K, D]
    labels: torch.Tensor | None = None  # [L', kv_heads, n], global cluster ids
    on_host: torch.Tensor | None = None  # [n] bool, None when no window is offloaded
    all_host: bool = False  # every window is offloaded
    # Triton selection and the CPU's union lane (``cluster_members()``): cluster sizes
    # [L', kv_heads, K] and each token's index in its cluster [L', kv_heads, n]
    # (query-independent, so computed once per concatenation).
    members: tuple[torch.Tensor, torch.Tensor] | None = None
    slots_dev: torch.Tensor | None = None  # ``slots`` on the selection's device (cached)
    version: int = 0  # a new number at each concatenation (keys the batched index)
    # (sizes, starts, members) of each layer's clusters, for batched selection (lazily).
    member_lists: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def cluster_members(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``members`` (computed on first use after each concatenation)."""
        assert self.labels is not None and self.centroids is not None
        if self.members is None:
            self.members = cluster_members(self.labels, self.centroids.shape[2])
        return self.members

    def slots_on(self, device: torch.device) -> torch.Tensor:
        """``slots`` on ``device`` (copied once per concatenation, not per layer)."""
        assert self.slots is not None
        if self.slots_dev is None or self.slots_dev.device != device:
            self.slots_dev = self.slots.to(device)
        return self.slots_dev


class ClusterKVPolicy(KVCompressor):
    """Cluster completed windows; select per query head at decode."""

    def __init__(self, server_args: ServerArgs) -> None:
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
        self.offload = server_args.kv_offload
        self.windows: dict[int, WindowIndex] = {}
        self.next_id = 0
        self.next_version = 0
        self.batch_index: BatchIndex | None = None  # cached across decode steps
        self.pool: MHATokenToKVPool | None = None
        self.allocator: TokenToKVPoolAllocator | None = None
        self.window_of_slot: torch.Tensor | None = None
        self.host: HostKVPool | None = None
        # Host -> device links: decode working sets, and prefill chunks' streamed reads.
        self.decode_link: HostReader | None = None
        self.prefill_link: HostReader | None = None
        self.last_link: HostReader | None = None
        self.working_sets: dict[int, DeviceWorkingSet] = {}  # id(req) -> its working set
        self.reset()

    # ------------------------------------------------------------------ lifetime
    def bind(self, pool: MHATokenToKVPool, allocator: TokenToKVPoolAllocator,
             host_pool: HostKVPool | None = None) -> None:
        check_full_layers("--clusterkv-full-layers", self.full_layers, pool.num_layers)
        self.pool = pool
        self.allocator = allocator
        self.window_of_slot = torch.full((pool.size + 1,), -1, dtype=torch.int64)
        allocator.free_listeners.append(self._on_free)
        if self.offload:
            if host_pool is None:
                raise ValueError("--kv-offload needs a host KV pool")
            if self.window != self.page:
                raise ValueError("--kv-offload needs a radix page of one clusterkv window")
            self.host = host_pool
            device = pool.k_buffer[0].device
            self.decode_link = HostReader(host_pool, device)
            self.prefill_link = HostReader(host_pool, device)

    def _on_free(self, slots: torch.Tensor) -> None:
        """Drop every window index that used a freed slot (and its host copy)."""
        assert self.window_of_slot is not None
        ids = self.window_of_slot[slots]
        for wid in torch.unique(ids[ids >= 0]).tolist():
            index = self.windows.pop(wid)
            self.window_of_slot[index.key] = -1
            if index.on_host:
                assert self.host is not None
                self.host.allocator.free(index.slots)

    def reset(self) -> None:
        """On flush_cache: every slot is free again, so every window index goes."""
        self.windows.clear()
        self.batch_index = None
        if self.window_of_slot is not None:
            self.window_of_slot.fill_(-1)
        if self.host is not None:
            self.host.allocator.clear()
        self.working_sets.clear()
        for link in (self.decode_link, self.prefill_link):
            if link is not None:
                link.stats = TransferStats()
        self.clustered_windows = 0
        self.reused_windows = 0
        self.unoffloaded_windows = 0
        self.offload_decode_steps = 0
        self.cluster_time = 0.0
        self.select_time = 0.0
        self.selected_tokens = 0
        self.candidate_tokens = 0
        self.union_read_tokens = 0  # CPU union lane: clustered rows read, per KV head
        self.union_candidate_tokens = 0

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "clustered_windows": self.clustered_windows,
            "reused_windows": self.reused_windows,
            "indexed_windows": len(self.windows),
            "cluster_index_bytes": sum(w.index_bytes() for w in self.windows.values()),
            "clustering_seconds": round(self.cluster_time, 4),
            "selection_seconds": round(self.select_time, 4),
            # Attended share of the clustered tokens over all decode selections so far.
            "selected_share": round(self.selected_tokens / max(1, self.candidate_tokens), 4),
        }
        if self.union_candidate_tokens:
            # CPU: clustered rows each KV head read (its query heads' union, padded to the
            # largest of the layer's) per clustered token.
            out["kv_head_read_share"] = round(
                self.union_read_tokens / self.union_candidate_tokens, 4)
        if self.offload:
            out.update(self._offload_stats(out["cluster_index_bytes"]))
        return out

    def _offload_stats(self, index_bytes: int) -> dict[str, Any]:
        pool, allocator, host = self.pool, self.allocator, self.host
        assert pool is not None and allocator is not None and host is not None
        assert self.decode_link is not None and self.prefill_link is not None
        pool_slots = pool.size - allocator.available_size()
        pool_bytes = pool_slots * kv_bytes_per_slot(pool.num_layers, pool.num_kv_heads,
                                                    pool.head_dim, pool.dtype)
        ws_rows = sum(ws.resident_rows() for ws in self.working_sets.values())
        ws_bytes = ws_rows * self.decode_link.row_bytes
        decode, prefill = self.decode_link.stats, self.prefill_link.stats
        last = self.last_link.stats if self.last_link is not None else decode
        return {
            "kv_offload": True,
            "host_slots": host.used_slots(),
            "host_total_slots": host.size,
            "host_kv_bytes": host.used_slots() * host.bytes_per_slot(),
            "offloaded_windows": sum(w.on_host for w in self.windows.values()),
            "unoffloaded_windows": self.unoffloaded_windows,
            # Device KV in use: pool slots (sinks, handles, tails, radix-cached pages) +
            # decode working sets + the cluster index.
            "device_kv_slots": pool_slots,
            "device_kv_bytes": pool_bytes + ws_bytes + index_bytes,
            "device_pool_bytes": pool_bytes,
            "device_working_set_rows": ws_rows,
            "device_working_set_bytes": ws_bytes,
            # Host -> device copies: decode copy-ins (changed rows only) + prefill streams.
            "host_to_device_bytes": decode.bytes + prefill.bytes,
            "host_to_device_bytes_last_step": last.step_bytes,
            "host_to_device_rows_last_step": last.step_rows,
            "decode_host_to_device_bytes": decode.bytes,
            "offload_decode_steps": self.offload_decode_steps,
        }

    def working_set(self, req: Req) -> DeviceWorkingSet:
        ws = self.working_sets.get(id(req))
        if ws is None:
            assert self.decode_link is not None
            ws = self.working_sets[id(req)] = DeviceWorkingSet(self.decode_link)
        return ws

    # ------------------------------------------------------------------ clustering
    def compress_reqs(self, scheduler: Scheduler, reqs: list[Req],
                      finishing: bool = False) -> None:
        for req in reqs:
            req.compressed_pages = len(req.page_lens)  # pages are never rewritten
        self._index(scheduler, reqs, cluster=True)
        if finishing:  # it attends no more: its working set leaves the device
            for req in reqs:
                self.working_sets.pop(id(req), None)

    def _index(self, scheduler: Scheduler, reqs: list[Req], cluster: bool) -> None:
        """Bring each request's index up to its completed windows: reuse the indexed ones
        (radix hits), cluster the new ones when ``cluster`` (else stop at the first: its
        tokens stay in the raw tail), and offload them. A request whose row no longer holds
        the slots its index was built on (its pages were swapped for the radix tree's copy)
        is indexed again."""
        pages_per_window = self.window // self.page
        table = scheduler.req_to_token_pool.req_to_token
        jobs: list[tuple[Req, int, torch.Tensor, bool]] = []  # (req, window, slots, raw)
        for req in reqs:
            row = table[req.req_pool_idx]
            state = req.kv_policy_state
            if not isinstance(state, ReqIndex) or not self._valid(state, req, row):
                state = req.kv_policy_state = ReqIndex()
            for w in range(len(state.window_ids), len(req.page_lens) // pages_per_window):
                first = w * pages_per_window
                start = sum(req.page_lens[:first])
                length = sum(req.page_lens[first:first + pages_per_window])
                lo = max(0, self.sink_tokens - w * self.window)
                jobs.append((req, w, row[start + lo:start + length].to(torch.int64),
                             length == self.window))
        if not jobs:
            return
        t0 = time.perf_counter()
        built = self._build(scheduler, jobs, cluster)
        for (req, w, _, _), wid in zip(jobs, built):
            state = req.kv_policy_state
            if wid is None or len(state.window_ids) != w:
                continue  # not clustered now (nor any later window of the request)
            state.window_ids.append(wid)
        for req in {id(r): r for r, _, _, _ in jobs}.values():
            self._concat(req, table[req.req_pool_idx])
        self.cluster_time += time.perf_counter() - t0

    def _valid(self, state: ReqIndex, req: Req, row: torch.Tensor) -> bool:
        if not state.window_ids:
            return True
        assert state.key_pos is not None and state.key_slots is not None
        ppw = self.window // self.page
        return (all(w in self.windows for w in state.window_ids)
                and state.end == sum(req.page_lens[:len(state.window_ids) * ppw])
                and torch.equal(row[state.key_pos].to(torch.int64), state.key_slots))

    def _build(self, scheduler: Scheduler, jobs: list[tuple[Req, int, torch.Tensor, bool]],
               cluster: bool) -> list[int | None]:
        """Window ids for ``jobs``: reused when indexed already, else clustered (windows of
        equal length in one batched k-means; None when not ``cluster``) and offloaded."""
        assert self.pool is not None and self.window_of_slot is not None
        ids: list[int | None] = []
        todo: dict[int, list[int]] = {}  # length -> positions in jobs
        for pos, (_, _, slots, raw) in enumerate(jobs):
            wid = int(self.window_of_slot[slots[0]])
            if wid >= 0 and torch.equal(self.windows[wid].key, slots):
                self.reused_windows += 1
                ids.append(wid)
                continue
            # Only a raw window can lack an index: an offloaded page is indexed while its
            # handle lives.
            assert raw, "an offloaded window lost its index"
            ids.append(None)
            if cluster:
                todo.setdefault(slots.numel(), []).append(pos)
        pool = self.pool
        layers = range(self.full_layers, pool.num_layers)
        new: list[int] = []
        for n, positions in todo.items():
            flat = torch.cat([jobs[p][2] for p in positions]).to(pool.k_buffer[0].device)
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
                slots = jobs[p][2]
                self.windows[wid] = WindowIndex(slots, slots, cents[:, j].contiguous(),
                                                labels[:, j].contiguous())
                self.window_of_slot[slots] = wid
                self.clustered_windows += 1
                ids[p] = wid
                new.append(p)
        if self.offload:
            for p in sorted(new):
                req, w, _, _ = jobs[p]
                self._offload(scheduler, req, w, ids[p])  # type: ignore[arg-type]
        return ids

    def _offload(self, scheduler: Scheduler, req: Req, w: int, wid: int) -> None:
        """Move window ``w`` of ``req`` (just clustered) to the host tier: its device slots
        are freed but the first clustered one, kept as the window's handle. If the host tier
        is full even after evicting the radix cache's unlocked pages, the window stays on
        the device (``unoffloaded_windows``)."""
        assert self.host is not None and self.pool is not None
        assert self.window_of_slot is not None
        index = self.windows[wid]
        n = index.slots.numel()
        while (self.host.allocator.available_size() < n
               and scheduler.tree_cache.evictable_size() > 0):
            scheduler.tree_cache.evict(1)  # frees the host copies of evicted windows
        host_slots = self.host.store(self.pool, index.slots, range(self.pool.num_layers))
        if host_slots is None:
            self.unoffloaded_windows += 1
            return
        handle = index.slots[:1].clone()
        self.window_of_slot[index.slots] = -1
        self.window_of_slot[handle] = wid
        index.key, index.slots, index.on_host = handle, host_slots, True
        lo = max(0, self.sink_tokens - w * self.window)
        shrink_page(scheduler, req, w, lo + 1)  # one page per window with offload

    def _concat(self, req: Req, row: torch.Tensor) -> None:
        """Concatenate a request's windows (cluster ids offset per window)."""
        state: ReqIndex = req.kv_policy_state
        ppw = self.window // self.page
        state.end = sum(req.page_lens[:len(state.window_ids) * ppw])
        state.slots_dev = state.member_lists = state.members = None
        self.next_version += 1
        state.version = self.next_version
        if not state.window_ids:
            state.slots = state.centroids = state.labels = state.on_host = None
            return
        windows = [self.windows[w] for w in state.window_ids]
        offsets, total = [], 0
        for w in windows:
            offsets.append(total)
            total += w.centroids.shape[2]
        state.slots = torch.cat([w.slots for w in windows])
        state.centroids = torch.cat([w.centroids for w in windows], dim=2)
        state.labels = torch.cat([w.labels + off for w, off in zip(windows, offsets)], dim=2)
        state.key_pos = torch.tensor(
            [sum(req.page_lens[:w * ppw]) + max(0, self.sink_tokens - w * self.window)
             for w in range(len(windows))], dtype=torch.int64)
        state.key_slots = row[state.key_pos].to(torch.int64)
        hosted = [w.on_host for w in windows]
        state.all_host = all(hosted)
        state.on_host = None if not any(hosted) else torch.cat(
            [torch.full((w.slots.numel(),), w.on_host) for w in windows])

    # ------------------------------------------------------------------ selection
    def make_selector(self, scheduler: Scheduler, reqs: list[Req], decode: bool
                      ) -> SlotSelector | None:
        # Index what a radix hit brought in before attention reads the row (an offloaded
        # page's tokens are only reachable through its index).
        self._index(scheduler, reqs, cluster=False)
        if not any(isinstance(r.kv_policy_state, ReqIndex) and r.kv_policy_state.slots is not None
                   for r in reqs):
            return None
        return ClusterKVSelector(self, scheduler, reqs, decode)

    def batch_index_of(self, states: list[ReqIndex], device: torch.device) -> BatchIndex:
        """The padded index of these requests, rebuilt only when one of them changed."""
        key = tuple(s.version for s in states)
        if self.batch_index is None or self.batch_index.key != key:
            self.batch_index = None  # free the old one first
            self.batch_index = build_batch_index(states, device)
        return self.batch_index


class ClusterKVSelector(SlotSelector):
    """Sinks + the best clusters within the budget + the unclustered tail, per query head.

    Offloaded window tokens are read from the host tier: through each request's working
    set at decode, streamed in prefill chunks."""

    def __init__(self, policy: ClusterKVPolicy, scheduler: Scheduler, reqs: list[Req],
                 decode: bool) -> None:
        self.policy = policy
        self.reqs = reqs
        self.decode = decode
        self.table = scheduler.req_to_token_pool.req_to_token
        self.device = scheduler.token_to_kv_pool.k_buffer[0].device
        self.uniform_weights = scheduler.token_to_kv_pool.uniform_weights
        # On the CPU each KV head reads the union of its query heads' selections once
        # (docs/benchmarks.md: 1.4x the budget on average instead of group x budget rows).
        self.union_lane = self.device.type == "cpu" and not policy.triton
        # Batched decode lane (select_batch): set on its first call of the step.
        self.plan: BatchPlan | None = None
        self.index: BatchIndex | None = None
        self.candidates = 0  # clustered tokens of the selecting requests
        self.planned = False
        self.tiers: list[Any] = [None] * len(reqs)
        if policy.offload:
            link = policy.decode_link if decode else policy.prefill_link
            assert link is not None and policy.prefill_link is not None
            link.stats.new_step()
            policy.last_link = link
            stream = HostStream(policy.prefill_link)
            hosted = [isinstance(r.kv_policy_state, ReqIndex)
                      and r.kv_policy_state.on_host is not None for r in reqs]
            self.tiers = [(policy.working_set(r) if decode else stream) if h else None
                          for r, h in zip(reqs, hosted)]
            if decode and any(hosted):
                policy.offload_decode_steps += 1

    def select_batch(self, layer_id: int, q: torch.Tensor, kv_indices: torch.Tensor,
                     offsets: list[int]) -> Any:
        """All requests at once (decode, torch kernels, no host tier); see clusterkv_batch."""
        policy = self.policy
        if not self.decode or policy.offload or policy.triton or not self.uniform_weights:
            return NotImplemented
        if layer_id < policy.full_layers:
            return None
        t0 = time.perf_counter()
        if not self.planned:  # the layout and the index are the same in every selecting layer
            self.planned = True
            states = [r.kv_policy_state if isinstance(r.kv_policy_state, ReqIndex) else None
                      for r in self.reqs]
            self.plan = plan_batch(states, offsets, q.shape[1], policy.budget,
                                   policy.sink_tokens, kv_indices.numel(), q.device)
            if self.plan is not None and len(self.plan.selecting) >= 2:
                # plan_batch selects only indexed requests (a state with slots).
                chosen = [states[i] for i in self.plan.selecting]
                self.index = policy.batch_index_of(chosen, q.device)  # type: ignore[arg-type]
                self.candidates = sum(s.slots.numel() for s in chosen)  # type: ignore[union-attr]
        if self.plan is None:
            return None
        if len(self.plan.selecting) < 2:
            # One selecting request: its own ops are fewer (H200, 8k / 32k, batch 1: 41 /
            # 45 ms per step request by request, 53 / 54 ms batched; docs/gpu.md).
            return NotImplemented
        assert self.index is not None
        out = select_batch(self.plan, self.index, layer_id - policy.full_layers, q, kv_indices,
                           policy.budget)
        policy.selected_tokens += len(self.plan.selecting) * q.shape[1] * policy.budget
        policy.candidate_tokens += self.candidates * q.shape[1]
        policy.select_time += time.perf_counter() - t0
        return out

    def select(self, layer_id: int, i: int, q: torch.Tensor, n_slots: int
               ) -> Selection | None:
        policy = self.policy
        req = self.reqs[i]
        state: ReqIndex | None = req.kv_policy_state
        if state is None or state.slots is None:
            return None
        n = state.slots.numel()
        # Prefill attends to everything; so do the first layers, and a budget covering all.
        full = q.shape[0] != 1 or layer_id < policy.full_layers or policy.budget >= n
        if full and state.on_host is None:
            return None  # everything is in the device row: plain full attention
        row = self.table[req.req_pool_idx]
        n_q = q.shape[1]
        fixed = torch.cat([row[:policy.sink_tokens], row[state.end:n_slots]]).to(torch.int64)
        if not full and self.union_lane and state.on_host is None:
            return self._select_union(layer_id, q, state, fixed)
        if full:
            pos = None
            chosen = state.slots.expand(n_q, -1)
        else:
            t0 = time.perf_counter()
            layer = layer_id - policy.full_layers
            args = (q[0], state.centroids[layer], state.labels[layer], policy.budget)
            if policy.triton:  # the Triton kernel takes the precomputed cluster members
                sizes, within = state.cluster_members()
                args += ((sizes[layer], within[layer]),)
            pos = policy.select_tokens(*args)  # on the device of the centroids
            chosen = state.slots_on(pos.device)[pos]
            policy.selected_tokens += pos.numel()
            policy.candidate_tokens += n * n_q
            policy.select_time += time.perf_counter() - t0
        dev = self.device
        fixed = fixed.to(chosen.device)
        if state.on_host is None:
            return Selection(torch.cat([fixed.expand(n_q, -1), chosen], dim=1).to(dev))
        tier = self.tiers[i]
        if state.all_host:
            return Selection(fixed.to(dev), host_slots=chosen.to(dev), host_tier=tier)
        # Some windows stayed on the device (the host tier was full): each chosen token is
        # read from its own tier, the other tier's entry masked.
        on_host = state.on_host.to(chosen.device)
        on_host = on_host.expand(n_q, -1) if pos is None else on_host[pos]
        zero = torch.zeros(chosen.shape, device=chosen.device)
        return Selection(
            torch.cat([fixed.expand(n_q, -1), chosen.masked_fill(on_host, 0)], dim=1).to(dev),
            log_weight=torch.cat([torch.zeros(n_q, fixed.numel(), device=chosen.device),
                                  zero.masked_fill(on_host, float("-inf"))], dim=1).to(dev),
            host_slots=chosen.masked_fill(~on_host, 0).to(dev),
            host_log_weight=zero.masked_fill(~on_host, float("-inf")).to(dev), host_tier=tier)

    def _select_union(self, layer_id: int, q: torch.Tensor, state: ReqIndex,
                      fixed: torch.Tensor) -> Selection:
        """The same sets as per-query-head selection, as one list per KV head (the union of
        its query heads' clusters) with a mask per query head: each chosen token is read
        once per KV head, and the sinks and the tail once instead of once per query head."""
        policy = self.policy
        t0 = time.perf_counter()
        layer = layer_id - policy.full_layers
        sizes, within = state.cluster_members()
        assert state.slots is not None and state.centroids is not None
        assert state.labels is not None
        n_q, n_kv = q.shape[1], state.centroids.shape[1]
        mask = cluster_token_mask(q[0], state.centroids[layer], state.labels[layer],
                                  policy.budget, (sizes[layer], within[layer]))
        pos, bias = kv_head_union(mask, n_kv)
        n = state.slots.numel()
        policy.selected_tokens += n_q * min(policy.budget, n)
        policy.candidate_tokens += n * n_q
        policy.union_read_tokens += pos.numel()
        policy.union_candidate_tokens += n * n_kv
        policy.select_time += time.perf_counter() - t0
        slots = torch.cat([fixed.expand(n_kv, -1), state.slots[pos]], dim=1)
        log_weight = torch.cat([torch.zeros(n_q, fixed.numel()), bias], dim=1)
        return Selection(slots, log_weight=log_weight, kv_head_lists=True)


@register_compressor("clusterkv")
def _make_clusterkv(server_args: ServerArgs) -> KVCompressor:
    return ClusterKVPolicy(server_args)
