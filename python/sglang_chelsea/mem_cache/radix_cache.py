"""RadixCache: page-granular prefix sharing over the KV pool (SGLang's RadixAttention).

A node's key is a run of token ids (a whole number of pages); its value is the run of
KV slots that hold those tokens. Pages may be physically compressed (a Chelsea chunk of
C tokens held by m <= C centroid slots), so every node also records the physical slot
count of each of its pages (``page_lens``): the logical and physical lengths differ.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

import torch

from sglang_chelsea.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPoolAllocator

if TYPE_CHECKING:
    from sglang_chelsea.managers.schedule_batch import Req

_EMPTY = torch.empty((0,), dtype=torch.int64)
_counter = itertools.count()


def page_prefix_len(a: list[int], b: list[int], page_size: int) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` in whole pages."""
    n = min(len(a), len(b))
    i = 0
    while i + page_size <= n and a[i:i + page_size] == b[i:i + page_size]:
        i += page_size
    return i


class TreeNode:
    """A radix tree node: ``key`` tokens held by ``value`` slots, page by page."""

    def __init__(self) -> None:
        self.children: dict[tuple[int, ...], TreeNode] = {}
        self.parent: Optional[TreeNode] = None
        self.key: list[int] = []
        self.value: torch.Tensor = _EMPTY
        self.page_lens: list[int] = []
        self.lock_ref = 0
        self.last_access_time = time.monotonic()
        self.id = next(_counter)

    @property
    def physical_len(self) -> int:
        return int(self.value.numel())

    def __lt__(self, other: "TreeNode") -> bool:
        return self.last_access_time < other.last_access_time


@dataclass
class MatchResult:
    """What a prefix lookup found: slots for ``logical_len`` tokens, page by page."""

    value: torch.Tensor
    page_lens: list[int]
    last_node: TreeNode

    @property
    def physical_len(self) -> int:
        return int(self.value.numel())


class RadixCache:
    """Prefix cache with lock references and LRU eviction of unlocked leaves."""

    def __init__(self, req_to_token_pool: ReqToTokenPool,
                 token_to_kv_pool_allocator: TokenToKVPoolAllocator,
                 page_size: int = 1, disable: bool = False) -> None:
        self.req_to_token_pool = req_to_token_pool
        self.allocator = token_to_kv_pool_allocator
        self.page_size = page_size
        self.disable = disable
        self.reset()

    # ------------------------------------------------------------------ basics
    def reset(self) -> None:
        self.root = TreeNode()
        self.root.lock_ref = 1
        self.evictable_size_ = 0
        self.protected_size_ = 0
        self.hit_tokens = 0
        self.queried_tokens = 0

    def evictable_size(self) -> int:
        """Physical slots held by unlocked nodes (reclaimable)."""
        return self.evictable_size_

    def protected_size(self) -> int:
        """Physical slots held by nodes locked by running requests."""
        return self.protected_size_

    def total_size(self) -> int:
        return self.evictable_size_ + self.protected_size_

    def logical_size(self) -> int:
        """Tokens represented by every node of the tree."""
        total, stack = 0, [self.root]
        while stack:
            node = stack.pop()
            total += len(node.key)
            stack.extend(node.children.values())
        return total

    def _page_key(self, key: list[int]) -> tuple[int, ...]:
        return tuple(key[: self.page_size])

    def _aligned(self, n: int) -> int:
        return n // self.page_size * self.page_size

    # ------------------------------------------------------------------ match
    def match_prefix(self, key: list[int]) -> MatchResult:
        """Longest cached page-aligned prefix of ``key``; splits a node on a partial hit."""
        if self.disable:
            return MatchResult(_EMPTY, [], self.root)
        key = key[: self._aligned(len(key))]
        node = self.root
        values: list[torch.Tensor] = []
        page_lens: list[int] = []
        for node, _ in self._walk(key):
            values.append(node.value)
            page_lens.extend(node.page_lens)
        value = torch.cat(values) if values else _EMPTY
        return MatchResult(value, page_lens, node)

    def _walk(self, key: list[int]) -> Iterator[tuple[TreeNode, int]]:
        """Yield ``(node, tokens matched in it)`` along the cached path of ``key``.

        A node matched only partly is split first, so every yielded node is matched whole.
        """
        node, now = self.root, time.monotonic()
        while key:
            child = node.children.get(self._page_key(key))
            if child is None:
                return
            child.last_access_time = now
            n = self._match_len(child.key, key)
            if n < len(child.key):
                child = self._split_node(child, n)
            yield child, n
            node, key = child, key[n:]

    def record_hit(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit

    def _match_len(self, a: list[int], b: list[int]) -> int:
        return page_prefix_len(a, b, self.page_size)

    def _split_node(self, child: TreeNode, n: int) -> TreeNode:
        """Split ``child`` after ``n`` tokens (a page boundary); return the new upper node."""
        pages = n // self.page_size
        phys = sum(child.page_lens[:pages])
        new = TreeNode()
        new.parent = child.parent
        new.key = child.key[:n]
        new.value = child.value[:phys]
        new.page_lens = child.page_lens[:pages]
        new.lock_ref = child.lock_ref
        new.last_access_time = child.last_access_time
        new.children = {self._page_key(child.key[n:]): child}
        assert child.parent is not None
        child.parent.children[self._page_key(new.key)] = new
        child.parent = new
        child.key = child.key[n:]
        child.value = child.value[phys:]
        child.page_lens = child.page_lens[pages:]
        return new

    # ------------------------------------------------------------------ insert
    def insert(self, key: list[int], value: torch.Tensor, page_lens: list[int]) -> int:
        """Insert whole pages; return how many leading tokens were already cached.

        The caller owns (and must free) its slots for the already-cached part.
        """
        if self.disable:
            return 0
        assert len(key) == len(page_lens) * self.page_size
        assert value.numel() == sum(page_lens)
        node, matched = self.root, 0
        for node, n in self._walk(key):
            matched += n
        pages = matched // self.page_size
        phys = sum(page_lens[:pages])
        key, value, page_lens = key[matched:], value[phys:], page_lens[pages:]
        now = time.monotonic()
        if key:
            new = TreeNode()
            new.parent = node
            new.key = list(key)
            new.value = value.clone()
            new.page_lens = list(page_lens)
            new.last_access_time = now
            node.children[self._page_key(key)] = new
            self.evictable_size_ += new.physical_len
        return matched

    # ------------------------------------------------------------------ locks
    def inc_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size_ -= node.physical_len
                self.protected_size_ += node.physical_len
            node.lock_ref += 1
            assert node.parent is not None
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 1:
                self.evictable_size_ += node.physical_len
                self.protected_size_ -= node.physical_len
            node.lock_ref -= 1
            assert node.lock_ref >= 0
            assert node.parent is not None
            node = node.parent

    # ------------------------------------------------------------------ eviction
    def evict(self, num_slots: int) -> int:
        """Free at least ``num_slots`` physical slots from unlocked leaves, LRU first."""
        if self.disable or num_slots <= 0:
            return 0
        leaves = [n for n in self._all_nodes() if not n.children and n.lock_ref == 0
                  and n is not self.root]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_slots and leaves:
            node = heapq.heappop(leaves)
            self.allocator.free(node.value)
            freed += node.physical_len
            self.evictable_size_ -= node.physical_len
            parent = node.parent
            assert parent is not None
            del parent.children[self._page_key(node.key)]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        return freed

    def _all_nodes(self) -> list[TreeNode]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def flush(self) -> None:
        """Drop every unlocked node (POST /flush_cache); only valid with no running request."""
        self.evict(self.evictable_size_)

    # ------------------------------------------------------------------ request hooks
    def cache_unfinished_req(self, req: "Req") -> None:
        """After a prefill chunk: share the request's completed pages through the tree."""
        self._cache_req_pages(req)

    def cache_finished_req(self, req: "Req") -> None:
        """On finish: keep completed pages in the tree, free everything else the request owns."""
        row = self.req_to_token_pool.req_to_token[req.req_pool_idx]
        if not self.disable:
            self._cache_req_pages(req)
        own = row[req.tree_phys_len:req.physical_len].to(torch.int64)
        self.allocator.free(own)
        self.dec_lock_ref(req.last_node)
        self.req_to_token_pool.free(req.req_pool_idx)
        req.req_pool_idx = None
        req.last_node = self.root
        req.tree_len = req.tree_phys_len = 0
        req.physical_len = 0

    def _cache_req_pages(self, req: "Req") -> None:
        """Insert the request's completed pages, then adopt the tree's slots for them.

        Pages another request inserted first are duplicates: the request frees its own
        copy and points its row at the tree's slots (insert, then re-match).
        """
        if self.disable:
            return
        pages = req.shareable_pages
        if pages * self.page_size <= req.tree_len:
            return
        row = self.req_to_token_pool.req_to_token[req.req_pool_idx]
        key = req.kv_token_ids()[: pages * self.page_size]
        phys_pages = sum(req.page_lens[:pages])
        value = row[:phys_pages].to(torch.int64)
        self.insert(key, value, list(req.page_lens[:pages]))
        match = self.match_prefix(key)
        assert match.physical_len == sum(match.page_lens)
        # Free the request's own slots that the tree now holds in its own copy.
        own_start = req.tree_phys_len
        mine = row[own_start:phys_pages].to(torch.int64)
        theirs = match.value[own_start:]
        if mine.numel() != theirs.numel() or not torch.equal(mine, theirs):
            keep = set(theirs.tolist())
            dup = mine[torch.tensor([s not in keep for s in mine.tolist()], dtype=torch.bool)] \
                if mine.numel() else mine
            self.allocator.free(dup)
            tail = row[phys_pages:req.physical_len].clone()
            new_p = match.physical_len + tail.numel()
            row[own_start:match.physical_len] = theirs.to(row.dtype)
            row[match.physical_len:new_p] = tail
            req.physical_len = new_p
            req.page_lens[:pages] = list(match.page_lens)
        self.dec_lock_ref(req.last_node)
        self.inc_lock_ref(match.last_node)
        req.last_node = match.last_node
        req.tree_len = len(key)
        req.tree_phys_len = match.physical_len
