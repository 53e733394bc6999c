"""Start ``python -m sglang_chelsea.launch_server`` on a free loopback port for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READY_LINE = "ready to roll"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return children


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def subprocess_pids(self) -> list[int]:
        """The server's spawned children (scheduler, tensor-parallel ranks, detokenizer; or the
        --dp-size workers), not the resource tracker."""
        pids = []
        for child in child_pids(self.proc.pid):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                pids.append(child)
        return pids

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the server, wait for it, and check that its subprocesses are gone too."""
        subprocs = self.subprocess_pids() if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise RuntimeError("the server ignored SIGTERM") from None
        wait_gone(subprocs, 10.0)
        return self.proc.returncode


def wait_gone(pids: list[int], timeout: float) -> None:
    """Wait until none of ``pids`` is alive; RuntimeError naming the survivors otherwise."""
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes still alive: {[p for p in pids if pid_alive(p)]}")
        time.sleep(0.1)


def cli_args(kwargs: dict[str, Any]) -> list[str]:
    """Engine keyword arguments as server flags (a bool as ``--flag`` / ``--no-flag``)."""
    out = []
    for key, value in kwargs.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            out.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            out += [f"--{flag}", str(value)]
    return out


def launch_server_process(args: list[str], log_path: Path, timeout: float = 240.0
                          ) -> ServerProcess:
    """Start a server and wait until it has printed its ready message (after warm-up)."""
    port = free_port()
    cmd = [sys.executable, "-m", "sglang_chelsea.launch_server", "--host", "127.0.0.1",
           "--port", str(port), *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if READY_LINE in server.log():
            return server
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-4000:]}")
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready after {timeout} s:\n{server.log()[-4000:]}")
