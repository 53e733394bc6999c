"""SnapKV (Li et al. 2024): at the end of prefill, the last prompt tokens pick what to keep.

When a request's prefill completes (its last chunk, or the re-prefill after a retraction),
the queries of its last ``--snapkv-window`` tokens (the observation window, captured per
layer by a :class:`QueryObserver` while the chunks run) score every earlier token, per layer
and KV head: softmax(q . k * scale) over all the prompt's keys (causal inside the window),
summed over the window's queries and the query heads of the KV head's group, then
max-pooled along positions (``--snapkv-kernel-size``) so a picked token brings its
neighbours. Each layer and KV head keeps its ``--snapkv-budget`` best tokens; the window
and every later token stay raw.

One slot list serves every layer and head, but a slot's K/V is per layer and head (as
Chelsea's centroids are): each layer/head's picks are written, in position order, into the
first ``budget`` slots of the prompt; the other prefix slots are freed and the row is
compacted, so a request holds ``budget + window`` slots after prefill (plus what it
generates), every one of weight 1. Keys are stored post-RoPE and attention over cached
slots has no causal mask, so the order of the kept tokens does not matter.

What is kept depends on the tokens at the end of the prompt, so kept slots cannot be shared
by prefix: this policy runs with the radix cache disabled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from sglang_chelsea.compression.base import (
    KVCompressor,
    QueryObserver,
    register_compressor,
    shrink_run,
)
from sglang_chelsea.mem_cache.memory_pool import head_rows

if TYPE_CHECKING:
    from sglang_chelsea.managers.schedule_batch import Req
    from sglang_chelsea.managers.scheduler import Scheduler
    from sglang_chelsea.mem_cache.host_pool import HostKVPool
    from sglang_chelsea.mem_cache.memory_pool import MHATokenToKVPool, TokenToKVPoolAllocator
    from sglang_chelsea.server_args import ServerArgs


def snapkv_scores(q_obs: torch.Tensor, keys: torch.Tensor, scaling: float,
                  kernel_size: int) -> torch.Tensor:
    """SnapKV's votes of the observation window for the tokens before it.

    ``q_obs [W, q_heads, D]``: the queries of the last W of N tokens; ``keys [kv_heads, N, D]``:
    the keys of all N (post-RoPE). Returns ``[kv_heads, N - W]`` float32: per KV head, the
    attention probability each earlier token gets, summed over the window's queries and the
    group's query heads, max-pooled over ``kernel_size`` positions (odd; 1: no pooling).
    """
    w, n_q, d = q_obs.shape
    n_kv, n, _ = keys.shape
    group = n_q // n_kv
    # Rows of KV head h: its group's query heads x window positions, as [group * W].
    q = q_obs.float().permute(1, 0, 2).reshape(n_kv, group * w, d)
    logits = torch.bmm(q, keys.float().transpose(1, 2)).mul_(scaling)  # [kv, group*W, N]
    window_pos = (n - w) + torch.arange(w, device=keys.device).repeat(group)
    future = torch.arange(n, device=keys.device)[None, :] > window_pos[:, None]
    logits.masked_fill_(future, float("-inf"))
    votes = torch.softmax(logits, dim=-1)[:, :, : n - w].sum(dim=1)  # [kv, N - W]
    if kernel_size > 1:
        votes = F.max_pool1d(votes[:, None], kernel_size, stride=1,
                             padding=kernel_size // 2)[:, 0]
    return votes


def compact_heads(pool: MHATokenToKVPool, layer: int, slots: torch.Tensor,
                  keep: torch.Tensor) -> None:
    """Per KV head ``h`` of ``layer``: copy the K/V of ``slots[keep[h]]`` into
    ``slots[:B]`` (``keep [kv_heads, B]`` positions into ``slots``, on the pool's device)."""
    n_kv, b = keep.shape
    width = pool.size + 1
    heads = torch.arange(n_kv, device=slots.device)
    src = head_rows(heads, slots[keep], width)
    dst = head_rows(heads, slots[:b].expand(n_kv, -1), width)
    for buf in (pool.k_buffer[layer], pool.v_buffer[layer]):
        flat = buf.view(-1, pool.head_dim)
        flat.index_copy_(0, dst, flat.index_select(0, src))  # gathered first: overlap is safe


@dataclass
class SnapKVState:
    """A request's SnapKV progress (``req.kv_policy_state``)."""

    end: int  # logical length at which its prefill ends
    queries: list[list[torch.Tensor]] = field(default_factory=list)  # per layer: window rows
    scaling: float = 1.0
    done: bool = False  # evicted, or nothing to evict
    # (page, slots it will hold) for the page the window starts in, until it completes
    pending_page: tuple[int, int] | None = None


class SnapKVObserver(QueryObserver):
    """Copies the observation-window rows of one extend batch's queries, per layer."""

    def __init__(self, spans: list[tuple[SnapKVState, int, int]]) -> None:
        self.spans = spans  # (state, first row, end row) in the batch's tokens

    def observe(self, layer_id: int, q: torch.Tensor, scaling: float) -> None:
        for state, lo, hi in self.spans:
            state.queries[layer_id].append(q[lo:hi].clone())
            state.scaling = scaling


class SnapKVPolicy(KVCompressor):
    """Keep ``budget`` prompt tokens per layer and KV head, picked by the last ``window``."""

    def __init__(self, server_args: ServerArgs) -> None:
        self.page = server_args.effective_page_size
        self.budget = server_args.snapkv_budget
        self.window = server_args.snapkv_window
        self.kernel_size = server_args.snapkv_kernel_size
        self.pool: MHATokenToKVPool | None = None
        self.reset()

    def bind(self, pool: MHATokenToKVPool, allocator: TokenToKVPoolAllocator,
             host_pool: HostKVPool | None = None) -> None:
        self.pool = pool

    def reset(self) -> None:
        self.compressed_reqs = 0
        self.evicted_tokens = 0
        self.score_time = 0.0

    def stats(self) -> dict[str, Any]:
        return {"snapkv_compressed_reqs": self.compressed_reqs,
                "evicted_tokens": self.evicted_tokens,
                "scoring_seconds": round(self.score_time, 4)}

    # ------------------------------------------------------------------ capture
    def make_query_observer(self, scheduler: Scheduler, reqs: list[Req]
                            ) -> QueryObserver | None:
        assert self.pool is not None
        spans: list[tuple[SnapKVState, int, int]] = []
        offset = 0
        for req in reqs:
            a, n = req.logical_len, req.extend_input_len
            state = req.kv_policy_state
            if state is None:
                end = req.seq_len()
                state = req.kv_policy_state = SnapKVState(
                    end, [[] for _ in range(self.pool.num_layers)])
                # Short prompts keep everything: nothing to score.
                state.done = end - self.window <= self.budget
            lo, hi = max(a, state.end - self.window), min(a + n, state.end)
            if not state.done and lo < hi:
                spans.append((state, offset + lo - a, offset + hi - a))
            offset += n
        return SnapKVObserver(spans) if spans else None

    # ------------------------------------------------------------------ eviction
    def compress_reqs(self, scheduler: Scheduler, reqs: list[Req],
                      finishing: bool = False) -> None:
        for req in reqs:
            state = req.kv_policy_state
            if not isinstance(state, SnapKVState):
                continue
            if not state.done and req.logical_len >= state.end:
                if not req.finished():  # a request ending at prefill needs no eviction
                    self._evict(scheduler, req, state)
                state.done = True
                state.queries = []
            if state.pending_page is not None and state.pending_page[0] < len(req.page_lens):
                page, slots = state.pending_page
                req.page_lens[page] = slots
                state.pending_page = None
            if state.done:  # page lengths only change at eviction (and the fix-up above)
                req.compressed_pages = len(req.page_lens)

    def _evict(self, scheduler: Scheduler, req: Req, state: SnapKVState) -> None:
        """Score, keep ``budget`` prefix tokens per layer/head, free the other prefix slots."""
        pool = self.pool
        assert pool is not None
        assert req.physical_len == req.logical_len == state.end, "snapkv acts once, on raw KV"
        on_gpu = pool.k_buffer[0].is_cuda
        t0 = time.perf_counter()
        n, b = state.end, self.budget
        e = n - self.window  # prefix tokens (before the window)
        row = scheduler.req_to_token_pool.req_to_token[req.req_pool_idx]
        slots = row[:n].to(torch.int64).to(pool.k_buffer[0].device)
        for layer in range(pool.num_layers):
            q_obs = torch.cat(state.queries[layer])
            assert q_obs.shape[0] == self.window, "the whole window's queries were captured"
            keys = pool.k_buffer[layer].index_select(1, slots)
            votes = snapkv_scores(q_obs, keys, state.scaling, self.kernel_size)
            keep = votes.topk(b, dim=-1).indices.sort(dim=-1).values  # [kv_heads, B]
            compact_heads(pool, layer, slots[:e], keep)
        shrink_run(scheduler, req, 0, e, b)
        self._account_pages(req, state, e)
        if on_gpu:
            torch.cuda.synchronize()
        self.score_time += time.perf_counter() - t0
        self.compressed_reqs += 1
        self.evicted_tokens += e - b

    def _account_pages(self, req: Req, state: SnapKVState, e: int) -> None:
        """Spread the ``budget`` kept slots over the pages of the first ``e`` tokens in
        proportion to their prefix tokens; the page the window starts in (if it starts
        mid-page) also holds its raw tokens, and is set when it completes."""
        s, b = self.page, self.budget
        full, part = divmod(e, s)

        def kept_before(t: int) -> int:  # kept slots ascribed to the first t prefix tokens
            return b * t // e

        for page in range(full):
            req.page_lens[page] = kept_before((page + 1) * s) - kept_before(page * s)
        if part:
            slots = b - kept_before(full * s) + (s - part)
            if full < len(req.page_lens):
                req.page_lens[full] = slots
            else:
                state.pending_page = (full, slots)


@register_compressor("snapkv")
def _make_snapkv(server_args: ServerArgs) -> KVCompressor:
    return SnapKVPolicy(server_args)
