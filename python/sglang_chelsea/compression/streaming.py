"""StreamingLLM baseline: keep the attention sinks and a recent window, evict the rest.

Eviction drops whole pages once they fall out of the window (the first page keeps its
sink tokens). An evicted page depends on later tokens, so it cannot be shared through
the radix tree: this policy runs with the radix cache disabled.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from sglang_chelsea.compression.base import KVCompressor, register_compressor, shrink_page

if TYPE_CHECKING:
    from sglang_chelsea.managers.schedule_batch import Req
    from sglang_chelsea.managers.scheduler import Scheduler
    from sglang_chelsea.server_args import ServerArgs


class StreamingCompressor(KVCompressor):
    """Sinks + the last ``streaming_window`` tokens (rounded up to whole pages)."""

    def __init__(self, server_args: "ServerArgs") -> None:
        self.page = server_args.chelsea_chunk_size
        self.sink_tokens = server_args.chelsea_sink_tokens
        self.window_pages = max(1, math.ceil(server_args.streaming_window / self.page))
        self.evicted_pages = 0

    def compress_reqs(self, scheduler: "Scheduler", reqs: list["Req"],
                      finishing: bool = False) -> None:
        for req in reqs:
            keep_from = len(req.page_lens) - self.window_pages
            for page in range(req.compressed_pages, max(keep_from, req.compressed_pages)):
                sinks = max(0, min(self.page, self.sink_tokens - page * self.page))
                shrink_page(scheduler, req, page, sinks)
                self.evicted_pages += 1
            req.compressed_pages = max(keep_from, req.compressed_pages)

    def stats(self) -> dict[str, Any]:
        return {"evicted_pages": self.evicted_pages}

    def reset(self) -> None:
        self.evicted_pages = 0


@register_compressor("streaming")
def _make_streaming(server_args: "ServerArgs") -> KVCompressor:
    return StreamingCompressor(server_args)
