"""Waiting-queue ordering: first come first served, or longest prefix match first."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sglang_chelsea.managers.schedule_batch import Req
    from sglang_chelsea.mem_cache.radix_cache import RadixCache


class SchedulePolicy:
    """Orders the waiting queue before a prefill batch is formed."""

    def __init__(self, policy: str, tree_cache: "RadixCache") -> None:
        if policy not in ("fcfs", "lpm"):
            raise ValueError(f"unknown schedule policy {policy!r}")
        self.policy = policy
        self.tree_cache = tree_cache

    def calc_priority(self, waiting_queue: list["Req"]) -> None:
        """Sort in place. ``lpm`` puts requests with the longest cached prefix first
        (ties keep arrival order), so shared prefixes are reused while still cached."""
        if self.policy == "fcfs" or self.tree_cache.disable or len(waiting_queue) < 2:
            return
        hits = {id(r): len(self.tree_cache.match_prefix(r.seq_ids()[: r.max_prefix_len()]).page_lens)
                for r in waiting_queue}
        waiting_queue.sort(key=lambda r: -hits[id(r)])
