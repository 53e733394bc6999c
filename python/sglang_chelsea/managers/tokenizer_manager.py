"""TokenizerManager: the main process's side of generation (asyncio).

It tokenizes and validates requests (a bad request raises ValueError before anything is
queued), sends them to the scheduler, receives detokenized outputs, and hands each HTTP
handler its request's responses. It also aborts requests whose client went away, answers
control calls (flush_cache, internal state) and keeps the Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq
import zmq.asyncio

from sglang_chelsea.managers.generate_request import (
    GenerateReqInput,
    GenerateReqItem,
    validate_request_budget,
    validate_tokenized_request,
)
from sglang_chelsea.managers.io_struct import (
    AbortReq,
    BatchStrOutput,
    FlushCacheReq,
    FlushCacheReqOutput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
    TokenizedGenerateReqInput,
)
from sglang_chelsea.managers.req_state import ReqState
from sglang_chelsea.metrics.collector import TokenizerMetricsCollector
from sglang_chelsea.model_loader import load_tokenizer
from sglang_chelsea.port_args import PortArgs
from sglang_chelsea.server_args import ServerArgs

logger = logging.getLogger(__name__)

DISCONNECT_CHECK_S = 4.0  # how often a waiting non-streaming request checks its client
CONTROL_TIMEOUT_S = 60.0  # longest wait for the scheduler to answer a control call


class ClientRequest(Protocol):
    """What the TokenizerManager needs of an HTTP request (Starlette's Request has it)."""

    async def is_disconnected(self) -> bool: ...


class ServerDeadError(RuntimeError):
    """A subprocess died: the request cannot complete."""


class ClientDisconnectedError(Exception):
    """The client of a non-streaming request went away; its requests were aborted."""


@dataclass
class _ReqEntry:
    """A request in flight: its accumulated state and the latest text from the detokenizer."""

    state: ReqState
    stream: bool
    event: asyncio.Event  # shared by the requests of one batch
    text: str = ""
    dirty: bool = False  # updated since last read
    first_token_time: float | None = None
    last_token_time: float = field(default_factory=time.perf_counter)
    error: str | None = None
    # Aborted because its consumer left: the rid stays reserved until the scheduler's final
    # output for it arrives, so a retry reusing the rid cannot receive this request's output.
    orphaned: bool = False


class _Communicator:
    """One request/response control call to the scheduler at a time. Each call carries a
    ``call_id`` that the reply echoes: the late reply of a call that timed out is dropped
    instead of answering the next call."""

    def __init__(self, socket: zmq.asyncio.Socket) -> None:
        self.socket = socket
        self.lock = asyncio.Lock()
        self.future: asyncio.Future | None = None
        self.call_id = 0

    async def __call__(self, request: Any, timeout: float = CONTROL_TIMEOUT_S) -> Any:
        async with self.lock:
            self.call_id += 1
            request.call_id = self.call_id
            self.future = asyncio.get_running_loop().create_future()
            await self.socket.send_pyobj(request)
            try:
                return await asyncio.wait_for(self.future, timeout)
            finally:
                self.future = None

    def handle_recv(self, response: Any) -> None:
        if response.call_id != self.call_id:
            logger.warning("dropping a late %s (call %d; call %d is current)",
                           type(response).__name__, response.call_id, self.call_id)
            return
        if self.future is not None and not self.future.done():
            self.future.set_result(response)


class TokenizerManager:
    """Runs inside the HTTP server's event loop; see the module docstring."""

    def __init__(self, server_args: ServerArgs, port_args: PortArgs,
                 scheduler_info: dict[str, Any]) -> None:
        self.server_args = server_args
        self.tokenizer = load_tokenizer(server_args.model_path, server_args.tokenizer_path)
        self.model_path: str = scheduler_info["model_path"]
        self.served_model_name = server_args.served_model_name or server_args.model_path \
            or self.model_path
        self.vocab_size: int = scheduler_info["vocab_size"]
        self.context_len: int = scheduler_info["context_length"]
        self.max_req_input_len: int = scheduler_info["max_req_input_len"]
        self.max_total_num_tokens: int = scheduler_info["max_total_num_tokens"]
        context = zmq.asyncio.Context(1)
        self.recv_from_detokenizer = context.socket(zmq.PULL)
        self.recv_from_detokenizer.bind(port_args.tokenizer_ipc_name)
        self.send_to_scheduler = context.socket(zmq.PUSH)
        self.send_to_scheduler.connect(port_args.scheduler_input_ipc_name)
        self.rid_to_state: dict[str, _ReqEntry] = {}
        self.flush_cache_communicator = _Communicator(self.send_to_scheduler)
        self.internal_state_communicator = _Communicator(self.send_to_scheduler)
        self.metrics = TokenizerMetricsCollector(self.served_model_name)
        self.dead_reason: str | None = None
        self.last_receive_time = time.monotonic()
        self._handle_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start receiving outputs (call inside the running event loop)."""
        if self._handle_task is None:
            self._handle_task = asyncio.get_running_loop().create_task(self.handle_loop())

    @property
    def healthy(self) -> bool:
        return self.dead_reason is None

    def set_dead(self, reason: str) -> None:
        """A subprocess died: fail every request in flight and every later one."""
        if self.dead_reason is None:
            self.dead_reason = reason
        for entry in self.rid_to_state.values():
            entry.error = reason
            entry.event.set()

    # ------------------------------------------------------------------ requests
    def prepare_request(self, obj: GenerateReqInput
                        ) -> list[tuple[GenerateReqItem, TokenizedGenerateReqInput]]:
        """Tokenize and validate every prompt; raises ValueError (nothing queued) on bad input."""
        if self.dead_reason is not None:
            raise ServerDeadError(self.dead_reason)
        prepared = []
        encoded: dict[str, list[int]] = {}
        for item in obj.to_items():
            if item.rid in self.rid_to_state:
                raise ValueError(f"rid {item.rid!r} is already in use")
            tokenized = item.tokenize(self.tokenizer, encoded)
            validate_tokenized_request(tokenized, self.vocab_size, self.max_req_input_len,
                                       self.context_len)
            prepared.append((item, tokenized))
        validate_request_budget([t for _, t in prepared], self.context_len)
        return prepared

    async def generate_request(
        self, obj: GenerateReqInput,
        prepared: list[tuple[GenerateReqItem, TokenizedGenerateReqInput]],
        request: ClientRequest | None = None,
    ) -> AsyncIterator[Any]:
        """Send prepared prompts; yield SGLang response dicts.

        Single prompt: each streamed update (when streaming), then the final response.
        Streamed updates carry only the new output logprobs (see ReqState.to_response).
        Batch, streaming: every update with an ``index`` field. Batch, not streaming: one list.
        A request not finished when the consumer stops (client gone) is aborted.
        """
        event = asyncio.Event()
        entries = []
        for item, tokenized in prepared:
            entry = _ReqEntry(
                state=ReqState(item.rid, item.sampling_params, item.return_logprob,
                               tokenized.top_logprobs_num, item.return_text_in_logprobs),
                stream=obj.stream, event=event)
            self.rid_to_state[item.rid] = entry
            entries.append(entry)
            if self.server_args.log_requests:
                logger.info("Receive: rid=%s, prompt_tokens=%d, sampling_params=%s", item.rid,
                            len(tokenized.input_ids), item.sampling_params)
            await self.send_to_scheduler.send_pyobj(tokenized)
        try:
            if obj.returns_single or obj.stream:
                async for index, out in self._wait(entries, request if not obj.stream else None):
                    if not obj.returns_single:
                        out["index"] = index
                    yield out
            else:
                results: list[Any] = [None] * len(entries)
                async for index, out in self._wait(entries, request):
                    results[index] = out
                yield results
        finally:
            for entry in entries:
                rid = entry.state.rid
                if self.rid_to_state.get(rid) is not entry:
                    continue
                if entry.state.finished or self.dead_reason is not None:
                    del self.rid_to_state[rid]
                    continue
                self._abort(rid, "the client disconnected")
                entry.orphaned = True  # removed by _handle_batch_output when it finishes
                state = entry.state
                self.metrics.observe_finished(
                    state.prompt_tokens, state.completion_tokens, state.cached_tokens,
                    time.perf_counter() - state.created_time, aborted=True)

    async def _wait(self, entries: list[_ReqEntry], request: ClientRequest | None
                    ) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """Yield ``(index, response)`` for updates (streaming) or when finished."""
        event = entries[0].event
        pending = set(range(len(entries)))
        while pending:
            try:
                await asyncio.wait_for(event.wait(), DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    logger.info("client disconnected; aborting %d request(s)", len(pending))
                    raise ClientDisconnectedError()
                continue
            event.clear()
            for i in sorted(pending):
                entry = entries[i]
                if entry.error is not None:
                    raise ServerDeadError(entry.error)
                if not entry.dirty:
                    continue
                entry.dirty = False
                if entry.state.finished:
                    pending.discard(i)
                elif not entry.stream:
                    continue
                yield i, entry.state.to_response(self.tokenizer, text=entry.text,
                                                 incremental=entry.stream)

    def _abort(self, rid: str, message: str) -> None:
        """Queue an AbortReq (never blocks: callable from a cancelled generator's cleanup)."""
        if self.dead_reason is None:
            self.send_to_scheduler.send_pyobj(AbortReq(rid, message))

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        """Abort one request (its client still gets the abort response) or every request."""
        rids = list(self.rid_to_state) if abort_all else [rid]
        for r in rids:
            if r in self.rid_to_state:
                self._abort(r, "aborted by request")

    # ------------------------------------------------------------------ outputs
    async def handle_loop(self) -> None:
        """Receive detokenized outputs and control replies until cancelled."""
        while True:
            msg = await self.recv_from_detokenizer.recv_pyobj()
            self.last_receive_time = time.monotonic()
            try:
                if isinstance(msg, BatchStrOutput):
                    self._handle_batch_output(msg)
                elif isinstance(msg, FlushCacheReqOutput):
                    self.flush_cache_communicator.handle_recv(msg)
                elif isinstance(msg, GetInternalStateReqOutput):
                    self.internal_state_communicator.handle_recv(msg)
                else:
                    logger.error("tokenizer manager: unknown message %r", type(msg).__name__)
            except Exception:  # one bad message must not stop every later request
                logger.exception("tokenizer manager: error handling %s", type(msg).__name__)

    def _handle_batch_output(self, batch: BatchStrOutput) -> None:
        now = time.perf_counter()
        for out, text in zip(batch.outputs, batch.texts):
            entry = self.rid_to_state.get(out.rid)
            if entry is None:
                continue
            if entry.orphaned:  # aborted because its client left (metrics already counted)
                if out.finished_reason is not None:
                    del self.rid_to_state[out.rid]
                continue
            state = entry.state
            prev_tokens = state.completion_tokens
            state.update(out)
            entry.text = text
            entry.dirty = True
            new_tokens = state.completion_tokens - prev_tokens
            if entry.stream and new_tokens > 0:
                if entry.first_token_time is None:
                    entry.first_token_time = now
                    self.metrics.observe_first_token(now - state.created_time)
                    new_tokens -= 1
                if new_tokens > 0:
                    self.metrics.observe_inter_token(now - entry.last_token_time, new_tokens)
                entry.last_token_time = now
            if state.finished:
                reason = state.finished_reason or {}
                self.metrics.observe_finished(state.prompt_tokens, state.completion_tokens,
                                              state.cached_tokens, now - state.created_time,
                                              reason.get("type") == "abort")
                if self.server_args.log_requests:
                    logger.info("Finish: rid=%s, finish_reason=%s, completion_tokens=%d, "
                                "text=%r", out.rid, reason, state.completion_tokens, text)
            entry.event.set()

    # ------------------------------------------------------------------ control
    async def flush_cache(self) -> FlushCacheReqOutput:
        return await self.flush_cache_communicator(FlushCacheReq())

    async def get_internal_state(self) -> dict[str, Any]:
        reply = await self.internal_state_communicator(GetInternalStateReq())
        return reply.state

    async def health_generate(self, timeout: float = 20.0) -> bool:
        """Healthy when a 1-token generation completes, or the scheduler keeps producing."""
        if self.dead_reason is not None:
            return False
        obj = GenerateReqInput(text="Hi", sampling_params={"max_new_tokens": 1},
                               rid=f"HEALTH_CHECK_{uuid.uuid4().hex}")
        tic = time.monotonic()

        async def run() -> None:
            async for _ in self.generate_request(obj, self.prepare_request(obj)):
                pass

        task = asyncio.get_running_loop().create_task(run())
        try:
            while time.monotonic() - tic < timeout:
                if task.done():
                    return task.exception() is None
                if self.last_receive_time > tic + 0.001 and self.dead_reason is None:
                    return True
                await asyncio.sleep(0.05)
            return False
        finally:
            if not task.done():
                task.cancel()


async def first_result(gen: Any) -> Any:
    """Await a non-streaming generation's single result; on a disconnect or a dead scheduler,
    the HTTP response to send instead (499 or 503)."""
    from fastapi.responses import Response

    from sglang_chelsea.entrypoints.http_errors import error_response

    try:
        return await gen.__anext__()
    except ClientDisconnectedError:
        return Response(status_code=499)
    except ServerDeadError as exc:
        return error_response(str(exc), 503)
    finally:
        await gen.aclose()
