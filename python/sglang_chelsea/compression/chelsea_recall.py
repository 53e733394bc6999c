"""Chelsea + recall: centroids on the device, their raw members in the host tier, and at
each decode step the members of the best-scoring centroids attended in their place.

When Chelsea compresses a chunk with ``--chelsea-recall-budget N > 0``, the chunk's raw K/V
(the clustered layers) is copied into the host pool first, with each token's centroid per
layer and KV head (a :class:`RecallEntry`, keyed by the centroid slots it belongs to, so a
radix hit on a compressed prefix finds it; dropped when those slots are freed). At each
decode step, and in each prefill chunk over the compressed prefix,
per layer and query head, every centroid of the request is ranked by its biased logit
``q . k * scale + log(size)``, size being its member count (in a prefill chunk, e.g. the
question after a long document, with the chunk's last query); centroids are taken in that
order while their members fit in ``N`` tokens; for those, the raw members are attended (from
the host tier) and the centroid is masked, never both. Everything else (sinks, raw recent chunks, other centroids) is
attended as stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from sglang_chelsea.compression.base import Selection, SlotSelector
from sglang_chelsea.mem_cache.memory_pool import head_rows

if TYPE_CHECKING:
    from sglang_chelsea.managers.schedule_batch import Req
    from sglang_chelsea.managers.scheduler import Scheduler
    from sglang_chelsea.mem_cache.host_pool import HostKVPool
    from sglang_chelsea.mem_cache.memory_pool import MHATokenToKVPool


@dataclass
class RecallEntry:
    """One compressed chunk: its centroid slots and its raw tokens in the host tier."""

    centroid_slots: torch.Tensor  # [m] device slots, in order
    host_slots: torch.Tensor  # [C] host slots of the chunk's raw tokens
    assignment: torch.Tensor  # [L', kv_heads, C] int64: each token's centroid (0..m-1)


class RecallStore:
    """Recall entries of compressed chunks, looked up by their first centroid slot."""

    def __init__(self, pool: "MHATokenToKVPool", host: "HostKVPool", first_layer: int) -> None:
        self.pool = pool
        self.host = host
        self.first_layer = first_layer
        self.entries: dict[int, RecallEntry] = {}
        self.entry_of_slot = torch.full((pool.size + 1,), -1, dtype=torch.int64)
        self.next_id = 0
        self.unrecallable_chunks = 0

    def add(self, slots: torch.Tensor, kept: torch.Tensor, assignment: torch.Tensor) -> None:
        """Copy the raw chunks ``slots [N, C]`` (before their centroids overwrite them) to
        the host tier and record their entries; ``assignment [L', N, H, C]``."""
        n_chunks, c = slots.shape
        host_slots = self.host.store(self.pool, slots.reshape(-1),
                                     range(self.first_layer, self.pool.num_layers))
        if host_slots is None:  # host tier full: these chunks stay merged-only
            self.unrecallable_chunks += n_chunks
            return
        host_slots = host_slots.view(n_chunks, c)
        assignment = assignment.cpu()
        for i in range(n_chunks):
            entry = RecallEntry(slots[i, :int(kept[i])].clone(), host_slots[i],
                                assignment[:, i].contiguous())
            self.entries[self.next_id] = entry
            self.entry_of_slot[entry.centroid_slots] = self.next_id
            self.next_id += 1

    def lookup(self, page_slots: torch.Tensor) -> Optional[RecallEntry]:
        """The entry whose centroids are exactly ``page_slots`` (None if not recallable)."""
        if page_slots.numel() == 0:
            return None
        eid = int(self.entry_of_slot[page_slots[0]])
        entry = self.entries.get(eid) if eid >= 0 else None
        if entry is None or not torch.equal(entry.centroid_slots, page_slots):
            return None
        return entry

    def on_free(self, slots: torch.Tensor) -> None:
        """Free the host slots of every entry whose centroid slots were freed."""
        ids = self.entry_of_slot[slots]
        for eid in torch.unique(ids[ids >= 0]).tolist():
            entry = self.entries.pop(eid)
            self.entry_of_slot[entry.centroid_slots] = -1
            self.host.allocator.free(entry.host_slots)

    def clear(self) -> None:
        self.entries.clear()
        self.entry_of_slot.fill_(-1)
        self.host.allocator.clear()


@dataclass
class ReqRecallIndex:
    """A request's recallable chunks, concatenated (rebuilt when more pages compress)."""

    pages: int
    cent_pos: torch.Tensor  # [M] row positions of the recallable centroid slots
    member: torch.Tensor  # [L', kv_heads, T] each raw token's centroid, in 0..M-1
    host_slots: torch.Tensor  # [T]
    sizes: torch.Tensor  # [L', kv_heads, M] float32: members per centroid (0: padding slot)


def build_req_index(store: RecallStore, row: torch.Tensor, req: "Req") -> Optional[ReqRecallIndex]:
    """Collect the entries of ``req``'s compressed pages, on the pool's device (the index is
    read by every layer of every step until more pages compress)."""
    cent_pos, members, hosts = [], [], []
    start = offset = 0
    for page in range(req.compressed_pages):
        m = req.page_lens[page]
        entry = store.lookup(row[start:start + m].to(torch.int64))
        if entry is not None:
            cent_pos.append(torch.arange(start, start + m))
            members.append(entry.assignment + offset)
            hosts.append(entry.host_slots)
            offset += m
        start += m
    if not cent_pos:
        return None
    member = torch.cat(members, dim=2)
    # Counted from the members, not read from the pool's weights: those are 1 for medoids
    # and without the size bias, and the budget is in member tokens.
    sizes = torch.zeros(*member.shape[:2], offset).scatter_add_(
        2, member, torch.ones(member.shape))
    dev = store.pool.k_buffer[0].device
    return ReqRecallIndex(req.compressed_pages, torch.cat(cent_pos).to(dev), member.to(dev),
                          torch.cat(hosts).to(dev), sizes.to(dev))


class RecallSelector(SlotSelector):
    """Per query head: the best centroids' raw members instead of those centroids."""

    def __init__(self, store: RecallStore, budget: int, first_layer: int,
                 scheduler: "Scheduler", reqs: list["Req"]) -> None:
        self.store = store
        self.budget = budget
        self.first_layer = first_layer
        self.reqs = reqs
        self.table = scheduler.req_to_token_pool.req_to_token
        self.indexes: list[Optional[ReqRecallIndex]] = []
        for req in reqs:
            index = req.kv_policy_state
            if not isinstance(index, ReqRecallIndex) or index.pages != req.compressed_pages:
                index = build_req_index(store, self.table[req.req_pool_idx], req)
                req.kv_policy_state = index
            self.indexes.append(index)
        self.recalled_tokens = 0

    def select(self, layer_id: int, i: int, q: torch.Tensor, n_slots: int
               ) -> Optional[Selection]:
        index = self.indexes[i]
        if index is None or layer_id < self.first_layer:
            return None
        pool = self.store.pool
        req = self.reqs[i]
        _, n_q, dim = q.shape
        dev = q.device
        kv_head = torch.arange(n_q, device=dev) // (n_q // pool.num_kv_heads)
        row = self.table[req.req_pool_idx][:n_slots].to(torch.int64).to(dev)
        width = pool.size + 1
        flat = head_rows(kv_head, row.expand(n_q, -1), width)
        log_w = torch.log(pool.weight_buffer[layer_id].view(-1).index_select(0, flat)
                          ).view(n_q, -1)  # [Hq, P]
        cent_pos = index.cent_pos
        cent_rows = head_rows(kv_head, row[cent_pos].expand(n_q, -1), width)
        k_cent = pool.k_buffer[layer_id].view(-1, dim).index_select(0, cent_rows)
        k_cent = k_cent.view(n_q, -1, dim)  # [Hq, M, D]
        sizes = index.sizes[layer_id - self.first_layer][kv_head]  # [Hq, M]
        # A prefill chunk ranks the centroids by its last query, the one whose attention
        # predicts the next token (e.g. the end of a question after a long document); the
        # best logit over all of the chunk's queries spread the budget over what any of them
        # wanted and lost passkeys (docs/benchmarks.md).
        logits = torch.einsum("hd,hmd->hm", q[-1].float(), k_cent.float())
        score = logits * dim ** -0.5 + torch.log(sizes)
        # Only the best `budget` centroids can fit (each live one holds >= 1 token; a dead
        # one, size 0, scores -inf and has no members): a top-k instead of a full sort.
        order = torch.topk(score, min(self.budget, score.shape[1]), dim=-1).indices
        fits = torch.cumsum(sizes.gather(1, order), dim=1) <= self.budget
        chosen = torch.zeros(score.shape, dtype=torch.bool, device=dev).scatter_(1, order, fits)
        member = index.member[layer_id - self.first_layer][kv_head]  # [Hq, T]
        recalled = chosen.gather(1, member)  # [Hq, T]
        take = min(self.budget, member.shape[1])
        pick = torch.topk(recalled.to(torch.int8), take, dim=1).indices
        live = recalled.gather(1, pick)
        log_w[:, cent_pos] = log_w[:, cent_pos].masked_fill(chosen, float("-inf"))
        self.recalled_tokens += int(live.sum())
        return Selection(
            slots=row, log_weight=log_w,
            host_slots=index.host_slots[pick],
            host_log_weight=torch.zeros(live.shape, device=dev).masked_fill(~live, float("-inf")))
