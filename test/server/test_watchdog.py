"""A dead subprocess makes the server log why and exit, taking the other subprocess along.

(That SIGTERM stops every subprocess is checked whenever a test server is stopped:
``ServerProcess.stop``.)
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import requests
from utils.server_process import launch_server_process, wait_gone


def test_dead_scheduler_makes_the_server_exit(tmp_path: Path, tiny_llama_dir: str) -> None:
    srv = launch_server_process(["--model-path", tiny_llama_dir, "--max-total-tokens", "4096",
                                 "--num-threads", "1"], tmp_path / "kill.log")
    try:
        subprocs = srv.subprocess_pids()
        assert len(subprocs) == 2
        os.kill(min(subprocs), signal.SIGKILL)  # the scheduler is spawned first
        assert srv.proc.wait(30) != 0
        assert "the scheduler process exited unexpectedly" in srv.log()
        wait_gone(subprocs, 10.0)
        with pytest.raises(requests.ConnectionError):
            requests.get(srv.url + "/health", timeout=5)
    finally:
        srv.stop()
