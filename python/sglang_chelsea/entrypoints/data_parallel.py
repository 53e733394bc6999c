"""``--dp-size N``: N workers on loopback behind SGLang's router (the ``sglang-router`` package).

Each worker is a whole server (``launch_server`` with ``--dp-size 1``) on its own loopback
port; once all are ready, ``python -m sglang_router.launch_router`` is started on
``--host``/``--port`` with the ``cache_aware`` policy, so requests that share a prefix go
to the worker already holding it (clustered, with Chelsea). The router, not this module,
balances the load. The two-command way (workers and router started by hand) is in
docs/scale-out.md.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import multiprocessing as mp
import subprocess
import sys
import time
import urllib.error
import urllib.request
from multiprocessing.process import BaseProcess

from sglang_chelsea.port_args import free_port
from sglang_chelsea.server_args import ServerArgs

logger = logging.getLogger(__name__)

ROUTER_MODULE = "sglang_router.launch_router"
ROUTER_POLICY = "cache_aware"
STARTUP_TIMEOUT_S = 900.0
ROUTER_LOG_LEVELS = {"debug": "debug", "info": "info", "warning": "warn", "error": "error"}


def router_command(worker_urls: list[str], host: str, port: int, metrics_port: int,
                   log_level: str = "info") -> list[str]:
    """The router's command line (its metrics endpoint kept on loopback too)."""
    return [sys.executable, "-m", ROUTER_MODULE, "--worker-urls", *worker_urls,
            "--host", host, "--port", str(port), "--policy", ROUTER_POLICY,
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
            "--log-level", ROUTER_LOG_LEVELS.get(log_level.lower(), "info")]


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


class DataParallelServer:
    """The worker processes and the router subprocess of one ``--dp-size`` launch."""

    def __init__(self, server_args: ServerArgs) -> None:
        self.server_args = server_args
        self.workers: list[BaseProcess] = []
        self.worker_urls: list[str] = []
        self.router: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the workers, wait until each has warmed up, then start the router and wait
        for its /health. RuntimeError says what failed."""
        from sglang_chelsea.entrypoints.http_server import launch_server

        args = self.server_args
        ctx = mp.get_context("spawn")
        events = []
        for i in range(args.dp_size):
            worker_args = dataclasses.replace(args, dp_size=1, host="127.0.0.1", port=free_port())
            event = ctx.Event()
            proc = ctx.Process(target=launch_server, args=(worker_args, event),
                               name=f"dp worker {i}")
            proc.start()
            self.workers.append(proc)
            self.worker_urls.append(f"http://127.0.0.1:{worker_args.port}")
            events.append(event)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for proc, event in zip(self.workers, events):
            while not event.wait(0.5):
                if not proc.is_alive():
                    raise RuntimeError(f"{proc.name} exited during startup "
                                       f"(exit code {proc.exitcode})")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{proc.name} did not become ready in time")
        cmd = router_command(self.worker_urls, args.host, args.port, free_port(), args.log_level)
        logger.info("starting the router: %s", " ".join(cmd))
        self.router = subprocess.Popen(cmd)
        health = f"http://{args.host}:{args.port}/health"
        while not _http_ok(health):
            if self.router.poll() is not None:
                raise RuntimeError(f"the router exited during startup "
                                   f"(exit code {self.router.returncode})")
            if time.monotonic() > deadline:
                raise RuntimeError("the router did not become ready in time")
            time.sleep(0.2)

    def dead_process(self) -> str | None:
        for proc in self.workers:
            if not proc.is_alive():
                return f"{proc.name} exited (exit code {proc.exitcode})"
        if self.router is not None and self.router.poll() is not None:
            return f"the router exited (exit code {self.router.returncode})"
        return None

    def shutdown(self, timeout: float = 30.0) -> None:
        """SIGTERM the router and the workers (each stops its own subprocesses)."""
        if self.router is not None and self.router.poll() is None:
            self.router.terminate()
        for proc in self.workers:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + timeout
        if self.router is not None:
            try:
                self.router.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.router.kill()
        for proc in self.workers:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)


def launch_data_parallel(server_args: ServerArgs) -> int:
    """Serve through the router until SIGINT/SIGTERM or a process dies; the exit code."""
    from sglang_chelsea.entrypoints.http_server import ready_message

    if importlib.util.find_spec("sglang_router") is None:
        logger.error("--dp-size needs SGLang's router: pip install sglang-router "
                     "(or pip install 'sglang-chelsea[router]')")
        return 1
    dp = DataParallelServer(server_args)
    try:
        dp.start()
        print(ready_message(server_args), flush=True)
        print(f"  Workers behind the router ({ROUTER_POLICY}): {' '.join(dp.worker_urls)}",
              flush=True)
        while True:
            time.sleep(1.0)
            reason = dp.dead_process()
            if reason is not None:
                logger.error("%s; stopping", reason)
                return 1
    except RuntimeError as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        dp.shutdown()
