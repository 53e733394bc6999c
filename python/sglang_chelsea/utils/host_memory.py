"""Keep freed host memory in the process heap (CPU serving).

glibc hands every allocation above its mmap threshold (at most 32 MB by default) to the
kernel with ``mmap`` and returns it on free; the next tensor of that size is zero-filled
page by page on first touch. The CPU paths allocate such tensors many times a step
(Chelsea's matching rounds, attention intermediates), and on this project's CPU box the
page faults cost more than the gathers and products that fill the memory: a prefill
step's clustering took 35% less time with freed memory kept (docs/benchmarks.md). Raising
the mmap and trim thresholds keeps freed blocks in the heap for reuse, as tcmalloc and
jemalloc do; the price is that the resident size stays at its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_LIMIT = 2**31 - 1  # mallopt takes an int


def retain_freed_host_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; False where there is no glibc ``mallopt``
    (other C libraries, other systems) or it refuses."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, _LIMIT), (_M_TRIM_THRESHOLD, _LIMIT), (_M_TOP_PAD, 256 * 2**20)))
    if ok:
        logger.info("host allocator: freed memory stays in the heap for reuse "
                    "(--disable-cpu-malloc-tuning turns this off)")
    return ok
