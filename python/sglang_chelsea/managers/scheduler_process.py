"""The scheduler subprocess: receives requests over ZMQ, runs Scheduler steps, sends outputs.

Loop: take every waiting message without blocking while the scheduler has work (block, with
a timeout to notice a dead parent, when idle); queue requests, aborts and control messages;
run one ``Scheduler.step()``; send its outputs to the detokenizer as a BatchTokenIDOutput.
"""

from __future__ import annotations

import logging
import os
import traceback
from multiprocessing.connection import Connection
from typing import Any

import zmq

from sglang_chelsea.distributed.parallel_state import init_tp_group
from sglang_chelsea.managers.io_struct import (
    AbortReq,
    BatchTokenIDOutput,
    FlushCacheReq,
    FlushCacheReqOutput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
    ReqOutput,
    TokenizedGenerateReqInput,
)
from sglang_chelsea.managers.scheduler import Scheduler
from sglang_chelsea.port_args import PortArgs
from sglang_chelsea.sampling.sampling_params import SamplingParams
from sglang_chelsea.server_args import ServerArgs
from sglang_chelsea.utils.log_config import configure_logger
from sglang_chelsea.utils.subprocess_signals import install_subprocess_signal_handlers

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 1000  # how often an idle scheduler checks that its parent is alive


class SchedulerEventLoop:
    """Connects a Scheduler to the tokenizer manager and the detokenizer."""

    def __init__(self, scheduler: Scheduler, port_args: PortArgs) -> None:
        self.scheduler = scheduler
        self.context = zmq.Context(1)
        self.recv_from_tokenizer = self.context.socket(zmq.PULL)
        self.recv_from_tokenizer.bind(port_args.scheduler_input_ipc_name)
        self.send_to_detokenizer = self.context.socket(zmq.PUSH)
        self.send_to_detokenizer.connect(port_args.detokenizer_ipc_name)
        self.send_to_tokenizer = self.context.socket(zmq.PUSH)
        self.send_to_tokenizer.connect(port_args.tokenizer_ipc_name)
        self.poller = zmq.Poller()
        self.poller.register(self.recv_from_tokenizer, zmq.POLLIN)
        # SamplingParams of each live request until its first output is sent.
        self.unsent_params: dict[str, SamplingParams] = {}
        self.parent_pid = os.getppid()

    # ------------------------------------------------------------------ receive
    def recv_requests(self, block: bool) -> list[Any]:
        """Every message waiting now; when ``block``, wait up to IDLE_POLL_MS for the first."""
        if block and not self.poller.poll(IDLE_POLL_MS):
            return []
        msgs = []
        while True:
            try:
                msgs.append(self.recv_from_tokenizer.recv_pyobj(zmq.NOBLOCK))
            except zmq.Again:
                return msgs

    def process_input_requests(self, msgs: list[Any]) -> None:
        rejected: list[ReqOutput] = []
        for msg in msgs:
            if isinstance(msg, TokenizedGenerateReqInput):
                self.unsent_params[msg.rid] = msg.sampling_params
                try:
                    self.scheduler.add_request(msg)
                except ValueError as exc:  # the tokenizer manager validates first; be safe
                    rejected.append(ReqOutput(
                        rid=msg.rid, new_output_ids=[],
                        finished_reason={"type": "abort", "message": str(exc)},
                        prompt_tokens=len(msg.input_ids), completion_tokens=0, cached_tokens=0))
            elif isinstance(msg, AbortReq):
                self.scheduler.abort_request(msg.rid, msg.message)
            elif isinstance(msg, FlushCacheReq):
                ok = self.scheduler.flush_cache()
                state = self.scheduler.get_internal_state()
                n = state["num_running_reqs"] + state["num_waiting_reqs"]
                self.send_to_tokenizer.send_pyobj(FlushCacheReqOutput(
                    success=ok, message="Cache flushed." if ok else
                    f"Cache not flushed: {n} requests are running or queued.",
                    call_id=msg.call_id))
            elif isinstance(msg, GetInternalStateReq):
                self.send_to_tokenizer.send_pyobj(GetInternalStateReqOutput(
                    self.internal_state(), call_id=msg.call_id))
            else:
                logger.error("scheduler: unknown message %r", type(msg).__name__)
        if rejected:
            self.send_outputs(rejected)

    def internal_state(self) -> dict[str, Any]:
        """The scheduler's state plus what the server needs at startup and for /get_load."""
        s = self.scheduler
        state = s.get_internal_state()
        state["num_waiting_tokens"] = sum(len(r.origin_input_ids) for r in s.waiting_queue)
        state["vocab_size"] = s.model_config.vocab_size
        state["model_path"] = s.model_runner.model_path
        return state

    # ------------------------------------------------------------------ send
    def send_outputs(self, outputs: list[ReqOutput]) -> None:
        params = [self.unsent_params.pop(out.rid, None) for out in outputs]
        self.send_to_detokenizer.send_pyobj(BatchTokenIDOutput(outputs, params))

    # ------------------------------------------------------------------ loop
    def event_loop(self) -> None:
        """Run until the parent process goes away."""
        while os.getppid() == self.parent_pid:
            msgs = self.recv_requests(block=not self.scheduler.has_work())
            if msgs:
                self.process_input_requests(msgs)
            if self.scheduler.has_work():
                outputs = self.scheduler.step()
                if outputs:
                    self.send_outputs(outputs)
        logger.info("parent process exited; scheduler stopping")


def run_scheduler_process(server_args: ServerArgs, port_args: PortArgs,
                          ready_writer: Connection) -> None:
    """Subprocess entry point: load the model, report readiness (or the error), serve.

    With ``--tp-size`` > 1 this process is tensor-parallel rank 0 (see tp_worker)."""
    install_subprocess_signal_handlers()
    configure_logger(server_args.log_level, " Scheduler")
    try:
        if server_args.tp_size > 1:
            init_tp_group(0, server_args.tp_size, port_args.dist_init_port, server_args.device)
        scheduler = Scheduler(server_args)
        loop = SchedulerEventLoop(scheduler, port_args)
    except Exception:
        logger.error("scheduler failed to start:\n%s", traceback.format_exc())
        ready_writer.send({"status": "error", "error": traceback.format_exc()})
        raise SystemExit(1)
    ready_writer.send({"status": "ready", **loop.internal_state()})
    ready_writer.close()
    try:
        loop.event_loop()
    except Exception:
        logger.error("scheduler crashed:\n%s", traceback.format_exc())
        raise SystemExit(1)
