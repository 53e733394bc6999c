"""Start, watch and stop the server's subprocesses (Scheduler and DetokenizerManager)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from sglang_chelsea.managers.detokenizer_manager import run_detokenizer_process
from sglang_chelsea.managers.scheduler_process import run_scheduler_process
from sglang_chelsea.managers.tp_worker import run_tp_worker_process
from sglang_chelsea.port_args import PortArgs
from sglang_chelsea.server_args import ServerArgs

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 900.0


@dataclass
class ServerProcesses:
    """The running subprocesses and what the scheduler reported when it became ready."""

    processes: dict[str, BaseProcess]
    scheduler_info: dict[str, Any]

    def dead_process(self) -> str | None:
        """A description of the first subprocess that has exited, or None."""
        for name, proc in self.processes.items():
            if not proc.is_alive():
                return f"the {name} process exited unexpectedly (exit code {proc.exitcode})"
        return None

    def shutdown(self, timeout: float = 5.0) -> None:
        """SIGTERM every subprocess, then SIGKILL those still alive after ``timeout``."""
        for proc in self.processes.values():
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)


def _wait_ready(name: str, proc: BaseProcess, reader: Connection, deadline: float
                ) -> dict[str, Any]:
    """The ready message of one subprocess; RuntimeError if it fails or dies first."""
    while time.monotonic() < deadline:
        if reader.poll(0.2):
            try:
                msg = reader.recv()
            except EOFError:
                break
            if msg.get("status") != "ready":
                raise RuntimeError(f"the {name} process failed to start:\n{msg.get('error')}")
            return msg
        if not proc.is_alive():
            break
    if proc.is_alive():
        raise RuntimeError(f"the {name} process did not become ready in time")
    raise RuntimeError(f"the {name} process exited during startup (exit code {proc.exitcode})")


def launch_subprocesses(server_args: ServerArgs, port_args: PortArgs) -> ServerProcesses:
    """Spawn the scheduler (tensor-parallel rank 0), the other tensor-parallel ranks and
    the detokenizer; return once all are ready.

    On failure every started process is stopped and RuntimeError says why.
    """
    ctx = mp.get_context("spawn")
    targets: dict[str, tuple[Any, tuple[Any, ...]]] = {
        "scheduler": (run_scheduler_process, ())}
    for rank in range(1, server_args.tp_size):
        targets[f"tp rank {rank}"] = (run_tp_worker_process, (rank,))
    targets["detokenizer"] = (run_detokenizer_process, ())
    procs: dict[str, BaseProcess] = {}
    readers: dict[str, Connection] = {}
    for name, (target, extra) in targets.items():
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=target, args=(server_args, port_args, *extra, writer),
                           name=name, daemon=True)
        proc.start()
        writer.close()
        procs[name], readers[name] = proc, reader
    launched = ServerProcesses(procs, {})
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        for name in targets:
            info = _wait_ready(name, procs[name], readers[name], deadline)
            if name == "scheduler":
                launched.scheduler_info = info
    except BaseException:
        launched.shutdown()
        raise
    logger.info("%s ready", ", ".join(targets))
    return launched
