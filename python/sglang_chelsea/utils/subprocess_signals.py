"""Signal handling of the server's subprocesses."""

from __future__ import annotations

import signal
import sys
from typing import Any


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    sys.exit(0)


def install_subprocess_signal_handlers() -> None:
    """Ignore SIGINT (Ctrl-C reaches the whole process group; the parent shuts us down) and
    exit cleanly on SIGTERM, so that multiprocessing resources are released."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
