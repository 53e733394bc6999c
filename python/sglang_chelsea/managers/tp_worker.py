"""A tensor-parallel rank other than 0: its shard of the model and of the KV pool, driven
by the rank-0 scheduler (``ModelRunner.serve_tp_followers``)."""

from __future__ import annotations

import logging
import traceback
from multiprocessing.connection import Connection

from sglang_chelsea.distributed.parallel_state import init_tp_group
from sglang_chelsea.model_executor.model_runner import ModelRunner
from sglang_chelsea.port_args import PortArgs
from sglang_chelsea.server_args import ServerArgs
from sglang_chelsea.utils.log_config import configure_logger
from sglang_chelsea.utils.subprocess_signals import install_subprocess_signal_handlers

logger = logging.getLogger(__name__)


def run_tp_worker_process(server_args: ServerArgs, port_args: PortArgs, tp_rank: int,
                          ready_writer: Connection) -> None:
    """Subprocess entry point: join the group, load the shard, report readiness, follow."""
    install_subprocess_signal_handlers()
    configure_logger(server_args.log_level, f" TP{tp_rank}")
    try:
        init_tp_group(tp_rank, server_args.tp_size, port_args.dist_init_port, server_args.device)
        runner = ModelRunner(server_args)
    except Exception:
        logger.error("tensor-parallel rank %d failed to start:\n%s", tp_rank,
                     traceback.format_exc())
        ready_writer.send({"status": "error", "error": traceback.format_exc()})
        raise SystemExit(1)
    ready_writer.send({"status": "ready"})
    ready_writer.close()
    try:
        runner.serve_tp_followers()
    except Exception as exc:  # rank 0 went away (or failed): nothing left to follow
        logger.info("tensor-parallel rank %d stopping: %s", tp_rank, exc)
