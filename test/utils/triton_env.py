"""Triton kernels in tests: on a machine without a GPU they run through the interpreter.

TRITON_INTERPRET must be set before triton is imported (triton.language builds its helpers
at import time); test/conftest.py sets it first, this module again for direct imports.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

ON_CPU = not torch.cuda.is_available()
DEV = "cpu" if ON_CPU else "cuda"
_IMPORTED_COMPILED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if ON_CPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def require_triton() -> None:
    """Skip without triton; fail when it was imported (compiled) before the interpreter flag
    was set on a machine without a GPU, where its kernels cannot run."""
    pytest.importorskip("triton")
    if ON_CPU and _IMPORTED_COMPILED:
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: set it at the top "
                    "of test/conftest.py (or in the environment) so that kernels can run on CPU")
