"""Runtime-core tests run torch single-threaded.

On a small shared machine, intra-op threads wait on each other for every tiny op
(decode attention took ~10 ms per matmul with 2 threads under load, ~10 us with 1).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
