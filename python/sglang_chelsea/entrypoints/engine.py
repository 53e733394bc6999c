"""The offline Engine: SGLang's ``Engine(**server_args).generate(...)`` in one process.

``generate`` blocks until its prompts finish, or with ``stream=True`` returns an iterator of
cumulative updates (SGLang's streaming shape). ``async_generate`` is the same for asyncio
code: concurrent calls are batched together by the scheduler (continuous batching), and
``await engine.async_generate(..., stream=True)`` returns an async iterator. Outputs pass
through the same incremental detokenizer as the server's, so streamed texts never show a
stop string or a broken UTF-8 character, and every final result equals the server's.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Union

from sglang_chelsea.managers.detokenizer_manager import DetokenizerManager
from sglang_chelsea.managers.generate_request import (
    UNSUPPORTED_FIELDS,
    GenerateReqInput,
    validate_request_budget,
)
from sglang_chelsea.managers.io_struct import BatchTokenIDOutput, TokenizedGenerateReqInput
from sglang_chelsea.managers.req_state import ReqState
from sglang_chelsea.managers.scheduler import Scheduler
from sglang_chelsea.server_args import ServerArgs

PromptInput = Union[str, list[str], None]
IdsInput = Union[list[int], list[list[int]], None]


@dataclass
class _Tracked:
    """One submitted prompt: its accumulated state and visible text."""

    tokenized: TokenizedGenerateReqInput
    state: ReqState
    text: str = ""
    dirty: bool = False  # updated since its consumer last looked


class Engine:
    """Offline generation without HTTP. ``Engine(model_path=..., max_total_tokens=...)`` takes
    the ServerArgs fields as keyword arguments.

    Not thread-safe: drive it from one thread (any number of ``async_generate`` calls on
    one event loop are fine)."""

    def __init__(self, **kwargs: Any) -> None:
        self.server_args = ServerArgs.from_kwargs(**kwargs)
        if self.server_args.tp_size > 1 or self.server_args.dp_size > 1:
            raise ValueError("the offline Engine runs in one process: tp_size and dp_size > 1 "
                             "need the server (python -m sglang_chelsea.launch_server)")
        logging.basicConfig(level=getattr(logging, self.server_args.log_level.upper(), logging.INFO),
                            format="[%(asctime)s] %(message)s")
        self.scheduler = Scheduler(self.server_args)
        self.tokenizer = self.scheduler.tokenizer
        self._detokenizer = (DetokenizerManager(self.tokenizer) if self.tokenizer is not None
                             else None)
        self._tracked: dict[str, _Tracked] = {}
        self._step_lock: tuple[Any, asyncio.Lock] | None = None  # (event loop, its lock)
        self._step_count = 0
        # Held while the scheduler runs: a cancelled asyncio call's step goes on in its
        # worker thread, and nothing may touch the scheduler until it ends.
        self._scheduler_lock = threading.Lock()

    # ------------------------------------------------------------------ generate
    def generate(self, prompt: PromptInput = None,
                 sampling_params: dict | list[dict] | None = None,
                 input_ids: IdsInput = None, return_logprob: bool | list[bool] = False,
                 logprob_start_len: int | list[int] | None = None,
                 top_logprobs_num: int | list[int] | None = None,
                 return_text_in_logprobs: bool = False,
                 rid: str | list[str] | None = None,
                 stream: bool = False, **sglang_fields: Any
                 ) -> dict | list[dict] | Iterator[dict]:
        """Generate for one prompt (returns a dict) or a list of prompts (returns a list).

        With ``stream=True``, an iterator of SGLang's streamed responses (cumulative text;
        an ``index`` field for a list of prompts); stopping it early aborts what is left.
        Raises ValueError for bad input; nothing is queued then. SGLang's arguments for
        features this runtime lacks (``image_data``, ``lora_path``, ``return_hidden_states``,
        ...) are accepted when None or False, and a ValueError otherwise.
        """
        obj, prepared = self._prepare(prompt, sampling_params, input_ids, return_logprob,
                                      logprob_start_len, top_logprobs_num,
                                      return_text_in_logprobs, rid, stream, sglang_fields)
        if stream:
            return self._stream(prepared, obj.returns_single)
        tracked = self._enqueue(prepared)
        try:
            while not all(t.state.finished for t in tracked):
                self._step()
        finally:
            self._release(tracked)
        return self._results(tracked, obj.returns_single)

    async def async_generate(self, prompt: PromptInput = None,
                             sampling_params: dict | list[dict] | None = None,
                             input_ids: IdsInput = None,
                             return_logprob: bool | list[bool] = False,
                             logprob_start_len: int | list[int] | None = None,
                             top_logprobs_num: int | list[int] | None = None,
                             return_text_in_logprobs: bool = False,
                             rid: str | list[str] | None = None,
                             stream: bool = False, **sglang_fields: Any
                             ) -> dict | list[dict] | AsyncIterator[dict]:
        """``generate`` for asyncio: concurrent calls share the scheduler's batches, and the
        model runs in a worker thread so the event loop stays responsive. With
        ``stream=True`` the awaited value is an async iterator of streamed responses."""
        obj, prepared = self._prepare(prompt, sampling_params, input_ids, return_logprob,
                                      logprob_start_len, top_logprobs_num,
                                      return_text_in_logprobs, rid, stream, sglang_fields)
        if stream:
            return self._async_stream(prepared, obj.returns_single)
        tracked = self._enqueue(prepared)
        try:
            while not all(t.state.finished for t in tracked):
                await self._async_step()
        finally:
            await self._async_release(tracked)
        return self._results(tracked, obj.returns_single)

    # ------------------------------------------------------------------ requests
    def _prepare(self, prompt: PromptInput, sampling_params: Any, input_ids: IdsInput,
                 return_logprob: Any, logprob_start_len: Any, top_logprobs_num: Any,
                 return_text_in_logprobs: bool, rid: Any, stream: bool,
                 sglang_fields: dict[str, Any]) -> tuple[GenerateReqInput, list[_Tracked]]:
        """Check and tokenize every prompt (ValueError names the first problem)."""
        for name, value in sglang_fields.items():
            if name not in UNSUPPORTED_FIELDS:
                raise TypeError(f"generate() got an unexpected keyword argument {name!r}")
            if value:
                raise ValueError(f"{name} is not supported by this runtime")
        obj = GenerateReqInput(
            text=prompt, input_ids=input_ids, sampling_params=sampling_params, rid=rid,
            return_logprob=return_logprob, logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num, return_text_in_logprobs=return_text_in_logprobs,
            stream=stream)
        obj.check()
        prepared = []
        encoded: dict[str, list[int]] = {}
        for item in obj.to_items():
            tokenized = item.tokenize(self.tokenizer, encoded)
            self.scheduler.validate(tokenized)
            prepared.append(_Tracked(tokenized, ReqState(
                item.rid, item.sampling_params, item.return_logprob,
                tokenized.top_logprobs_num, item.return_text_in_logprobs)))
        validate_request_budget([t.tokenized for t in prepared], self.scheduler.context_len)
        self._check_rids_free(prepared)
        return obj, prepared

    def _check_rids_free(self, prepared: list[_Tracked]) -> None:
        for t in prepared:
            if t.state.rid in self._tracked:
                raise ValueError(f"rid {t.state.rid!r} is already in use by a running request")

    def _enqueue(self, prepared: list[_Tracked]) -> list[_Tracked]:
        self._check_rids_free(prepared)
        with self._scheduler_lock:
            for t in prepared:
                self.scheduler.add_request(t.tokenized)
                self._tracked[t.state.rid] = t
        return prepared

    def _step(self) -> None:
        """Run one scheduler step and route its outputs to their requests."""
        with self._scheduler_lock:
            self._step_locked()

    def _step_locked(self) -> None:
        if not self.scheduler.has_work():
            pending = sorted(r for r, t in self._tracked.items() if not t.state.finished)
            raise RuntimeError(f"scheduler idle with unfinished requests {pending}")
        outputs = self.scheduler.step()
        self._step_count += 1
        if not outputs:
            return
        tracked = [self._tracked.get(out.rid) for out in outputs]
        if self._detokenizer is not None:
            # The detokenizer reads a request's parameters with its first output (an output
            # of a request no longer tracked is decoded with the defaults and dropped).
            params = [t.tokenized.sampling_params if t is not None else None for t in tracked]
            texts = self._detokenizer.handle_batch_token_id_out(
                BatchTokenIDOutput(outputs, params)).texts
        else:
            texts = [""] * len(outputs)
        for out, text, t in zip(outputs, texts, tracked):
            if t is not None:
                t.state.update(out)
                t.text = text
                t.dirty = True

    def _release(self, tracked: list[_Tracked]) -> None:
        """Abort what has not finished (a stopped stream, an exception), let the scheduler
        free it, and stop tracking."""
        with self._scheduler_lock:
            self._release_locked(tracked)

    def _release_locked(self, tracked: list[_Tracked]) -> None:
        open_ = [t for t in tracked if not t.state.finished and t.state.rid in self._tracked]
        for t in open_:
            self.scheduler.abort_request(t.state.rid, "the consumer stopped")
        while any(not t.state.finished for t in open_) and self.scheduler.has_work():
            self._step_locked()
        for t in tracked:
            if self._tracked.get(t.state.rid) is t:
                del self._tracked[t.state.rid]

    def _results(self, tracked: list[_Tracked], single: bool) -> dict | list[dict]:
        results = [t.state.to_response(self.tokenizer, text=t.text) for t in tracked]
        return results[0] if single else results

    def _updates(self, tracked: list[_Tracked], pending: set[int], single: bool
                 ) -> list[dict]:
        """The streamed responses of the requests updated since the last call (a finished
        one leaves ``pending``)."""
        updates = []
        for i in sorted(pending):
            t = tracked[i]
            if not t.dirty:
                continue
            t.dirty = False
            if t.state.finished:
                pending.discard(i)
            out = t.state.to_response(self.tokenizer, text=t.text, incremental=True)
            if not single:
                out["index"] = i
            updates.append(out)
        return updates

    def _stream(self, prepared: list[_Tracked], single: bool) -> Iterator[dict]:
        tracked = self._enqueue(prepared)
        pending = set(range(len(tracked)))
        try:
            while pending:
                self._step()
                yield from self._updates(tracked, pending, single)
        finally:
            self._release(tracked)

    # ------------------------------------------------------------------ asyncio
    def _lock(self) -> asyncio.Lock:
        """The lock serialising scheduler steps on the running event loop."""
        loop = asyncio.get_running_loop()
        if self._step_lock is None or self._step_lock[0] is not loop:
            self._step_lock = (loop, asyncio.Lock())
        return self._step_lock[1]

    async def _async_step(self) -> None:
        """One scheduler step in a worker thread, unless another caller ran one while this
        one waited for the lock (every step advances every request)."""
        seen = self._step_count
        async with self._lock():
            if self._step_count == seen:
                await asyncio.to_thread(self._step)

    async def _async_release(self, tracked: list[_Tracked]) -> None:
        async with self._lock():
            await asyncio.to_thread(self._release, tracked)

    async def _async_stream(self, prepared: list[_Tracked], single: bool
                            ) -> AsyncIterator[dict]:
        tracked = self._enqueue(prepared)
        pending = set(range(len(tracked)))
        try:
            while pending:
                await self._async_step()
                for out in self._updates(tracked, pending, single):
                    yield out
        finally:
            await self._async_release(tracked)

    # ------------------------------------------------------------------ info and control
    def get_server_info(self) -> dict[str, Any]:
        info = self.server_args.to_dict()
        with self._scheduler_lock:
            info.update(self.scheduler.get_internal_state())
        return info

    def flush_cache(self) -> bool:
        """Drop the radix cache (False while requests are queued or running)."""
        with self._scheduler_lock:
            return self.scheduler.flush_cache()

    def shutdown(self) -> None:
        """Release the model and pools."""
        self.scheduler = None  # type: ignore[assignment]

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
