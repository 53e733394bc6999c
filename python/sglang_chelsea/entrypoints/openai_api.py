"""OpenAI-compatible adapters: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Each request becomes a GenerateReqInput for the TokenizerManager; its SGLang responses
(cumulative text + meta_info; streamed ones carry only the new output logprobs) are reshaped
into OpenAI objects or stream chunks.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from sglang_chelsea.entrypoints.chat_output import ChatOutputStream, split_chat_output
from sglang_chelsea.entrypoints.chat_template import apply_chat_template
from sglang_chelsea.entrypoints.http_errors import (
    error_body,
    error_response,
    validation_error_message,
)
from sglang_chelsea.entrypoints.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
)
from sglang_chelsea.entrypoints.reasoning import check_reasoning_parser
from sglang_chelsea.entrypoints.sse import SSE_DONE, sse_data, sse_response
from sglang_chelsea.entrypoints.tool_calls import (
    ToolCall,
    ToolMode,
    check_tools,
    forced_calls_schema,
    make_parser,
    template_messages,
)
from sglang_chelsea.managers.generate_request import GenerateReqInput
from sglang_chelsea.managers.tokenizer_manager import (
    ServerDeadError,
    first_result,
    TokenizerManager,
)

LogprobEntry = list[Any]  # [logprob, token_id, token_text]


def finish_reason_str(reason: dict[str, Any] | None) -> str | None:
    """SGLang's finish_reason dict -> OpenAI's string ("stop", "length" or "abort")."""
    return None if reason is None else reason.get("type")


def matched_stop(reason: dict[str, Any] | None) -> Any:
    return None if reason is None else reason.get("matched")


def usage_of(metas: list[dict[str, Any]], n: int = 1) -> dict[str, Any]:
    """OpenAI ``usage`` of the choices' meta_info in index order: with ``n`` choices per
    prompt, each prompt (and its cached part) counts once, as OpenAI and SGLang count."""
    prompt = sum(m["prompt_tokens"] for m in metas[::n])
    completion = sum(m["completion_tokens"] for m in metas)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(m["cached_tokens"]
                                                           for m in metas[::n])}}


def completion_logprobs(entries: list[LogprobEntry], tops: list[Any] | None,
                        offset: int) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object; ``offset`` is the first token's text offset."""
    text_offset = []
    for entry in entries:
        text_offset.append(offset)
        offset += len(entry[2] or "")
    return {
        "tokens": [e[2] for e in entries],
        "token_logprobs": [e[0] for e in entries],
        "top_logprobs": [{t[2]: t[0] for t in top} if top else None for top in tops]
        if tops is not None else None,
        "text_offset": text_offset,
    }


def chat_logprobs(entries: list[LogprobEntry], tops: list[Any] | None) -> dict[str, Any]:
    """The chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    content = []
    for i, (logprob, _, text) in enumerate(entries):
        top = tops[i] if tops is not None and i < len(tops) and tops[i] else []
        content.append({
            "token": text, "logprob": logprob, "bytes": list((text or "").encode()),
            "top_logprobs": [{"token": t[2], "logprob": t[0], "bytes": list((t[2] or "").encode())}
                             for t in top]})
    return {"content": content}


class OpenAIServing:
    """Serves the OpenAI endpoints on top of a TokenizerManager."""

    def __init__(self, tokenizer_manager: TokenizerManager, chat_template: str | None,
                 tool_call_parser: str | None = None, reasoning_parser: str | None = None
                 ) -> None:
        self.tm = tokenizer_manager
        self.chat_template = chat_template
        self.tool_call_parser = make_parser(tool_call_parser)
        check_reasoning_parser(reasoning_parser)
        self.reasoning_parser = reasoning_parser

    # ------------------------------------------------------------------ models
    def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": self.tm.served_model_name, "object": "model", "created": int(time.time()),
            "owned_by": "sglang", "root": self.tm.model_path,
            "max_model_len": self.tm.context_len}]}

    # ------------------------------------------------------------------ helpers
    def _prepare(self, obj: GenerateReqInput, max_tokens: int | None) -> list[Any]:
        """Check and tokenize; with no token limit, allow the rest of the context."""
        obj.check()
        prepared = self.tm.prepare_request(obj)
        if max_tokens is None:
            for _, tokenized in prepared:
                tokenized.sampling_params.max_new_tokens = \
                    self.tm.context_len - len(tokenized.input_ids)
        return prepared

    async def _respond(self, obj: GenerateReqInput, prepared: list[Any], raw_request: Request,
                       render: Any, stream: Any) -> Response:
        """Non-streaming: ``render(list of SGLang responses)``; streaming: ``stream(generator)``."""
        gen = self.tm.generate_request(obj, prepared, raw_request)
        if obj.stream:
            return sse_response(stream(gen))
        outs = await first_result(gen)
        if isinstance(outs, Response):
            return outs
        return JSONResponse(render(outs if isinstance(outs, list) else [outs]))

    @staticmethod
    async def _events(gen: AsyncIterator[dict[str, Any]]
                      ) -> AsyncIterator[tuple[int, str, dict[str, Any]]]:
        """``(index, new text, response)`` for each streamed SGLang response."""
        sent: dict[int, str] = {}
        async for out in gen:
            index = out.get("index", 0)
            previous = sent.get(index, "")
            sent[index] = out["text"]
            yield index, out["text"][len(previous):], out

    # ------------------------------------------------------------------ completions
    async def create_completion(self, body: Any, raw_request: Request) -> Response:
        try:
            req = CompletionRequest.model_validate(body)
        except ValidationError as exc:
            return error_response(validation_error_message(exc))
        try:
            if req.suffix:
                raise ValueError("suffix is not supported")
            prompt = req.prompt
            if isinstance(prompt, list) and not prompt:
                raise ValueError("prompt must not be empty")
            is_text = isinstance(prompt, str) or isinstance(prompt[0], str)
            single = isinstance(prompt, str) or isinstance(prompt[0], int)
            obj = GenerateReqInput(
                text=prompt if is_text else None, input_ids=None if is_text else prompt,
                sampling_params=req.sampling_params(req.max_tokens),
                rid=req.rid if single else None,
                return_logprob=req.logprobs is not None, top_logprobs_num=req.logprobs or 0,
                # echo + logprobs: the prompt's tokens get logprobs too (the first: null), as
                # in OpenAI's legacy API and SGLang, e.g. for scoring a text with max_tokens 0.
                logprob_start_len=0 if req.echo and req.logprobs is not None else -1,
                return_text_in_logprobs=True, stream=req.stream)
            prepared = self._prepare(obj, req.max_tokens)
        except ServerDeadError as exc:
            return error_response(str(exc), 503)
        except ValueError as exc:
            return error_response(str(exc))
        prompts = [self.tm.tokenizer.decode(tok.input_ids) if tok.input_text is None
                   else tok.input_text for _, tok in prepared]
        cid = f"cmpl-{prepared[0][0].rid}"
        created = int(time.time())
        model = self.tm.served_model_name

        def logprobs_of(meta: dict[str, Any], offset: int, with_prompt: bool = False) -> Any:
            """The output tokens' logprobs, their text starting at ``offset``; preceded by
            the prompt's (text from 0) when ``with_prompt``."""
            if req.logprobs is None:
                return None
            tops = meta.get("output_top_logprobs") if req.logprobs else None
            out = completion_logprobs(meta["output_token_logprobs"], tops, offset)
            if not with_prompt:
                return out
            prompt_tops = meta.get("input_top_logprobs") if req.logprobs else None
            merged = completion_logprobs(meta.get("input_token_logprobs") or [], prompt_tops, 0)
            for key in ("tokens", "token_logprobs", "text_offset"):
                merged[key] += out[key]
            if merged["top_logprobs"] is not None and out["top_logprobs"] is not None:
                merged["top_logprobs"] += out["top_logprobs"]
            return merged

        def render(outs: list[dict[str, Any]]) -> dict[str, Any]:
            choices = []
            for i, out in enumerate(outs):
                prefix = prompts[i] if req.echo else ""
                reason = out["meta_info"]["finish_reason"]
                choices.append({"index": i, "text": prefix + out["text"],
                                "logprobs": logprobs_of(out["meta_info"], len(prefix),
                                                        with_prompt=req.echo),
                                "finish_reason": finish_reason_str(reason),
                                "matched_stop": matched_stop(reason)})
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": choices,
                    "usage": usage_of([o["meta_info"] for o in outs], obj.parallel_sample_num)}

        async def stream(gen: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
            metas: dict[int, dict[str, Any]] = {}
            text_len: dict[int, int] = {}
            try:
                async for index, delta, out in self._events(gen):
                    meta = out["meta_info"]
                    # The first chunk of a choice carries the echoed prompt: its tokens' text
                    # offsets start after it, as in the non-streaming response.
                    first = index not in metas and req.echo
                    prefix = prompts[index] if first else ""
                    metas[index] = meta
                    reason = meta["finish_reason"]
                    start = text_len.get(index, 0) + len(prefix)
                    logprobs = logprobs_of(meta, start, with_prompt=first)
                    text_len[index] = start + len(delta)
                    delta = prefix + delta
                    if not delta and reason is None and not (logprobs and logprobs["tokens"]):
                        continue
                    yield sse_data({
                        "id": cid, "object": "text_completion", "created": created,
                        "model": model, "choices": [{
                            "index": index, "text": delta, "logprobs": logprobs,
                            "finish_reason": finish_reason_str(reason),
                            "matched_stop": matched_stop(reason)}]})
                if req.include_usage:
                    yield sse_data({"id": cid, "object": "text_completion", "created": created,
                                    "model": model, "choices": [],
                                    "usage": usage_of([metas[i] for i in sorted(metas)],
                                                      obj.parallel_sample_num)})
            except ServerDeadError as exc:
                yield sse_data(error_body(str(exc), 503))
            yield SSE_DONE

        return await self._respond(obj, prepared, raw_request, render, stream)

    # ------------------------------------------------------------------ chat
    def _chat_prompt_ids(self, req: ChatCompletionRequest, tools: list[dict[str, Any]] | None
                         ) -> list[int]:
        messages = []
        for m in req.messages:
            message = m.model_dump(exclude_none=True)
            message["content"] = m.text_content()
            messages.append(message)
        prompt = apply_chat_template(self.tm.tokenizer, self.chat_template,
                                     template_messages(messages), add_generation_prompt=True,
                                     continue_final_message=req.continue_final_message,
                                     template_kwargs=req.chat_template_kwargs, tools=tools)
        return self.tm.tokenizer.encode(prompt, add_special_tokens=False)

    def _tool_mode(self, req: ChatCompletionRequest, params: dict[str, Any]
                   ) -> tuple[list[dict[str, Any]] | None, ToolMode]:
        """``(tools for the template, tool mode)`` of a request; a forced tool choice
        (required or named) sets the JSON schema of its calls in ``params``."""
        tools = req.tools or []
        name = check_tools(tools, req.tool_choice)
        if not tools or req.tool_choice == "none":
            return None, ToolMode()
        forced = req.tool_choice == "required" or name is not None
        if forced:
            if any(k in params for k in ("regex", "json_schema", "ebnf")):
                raise ValueError("a required or named tool_choice cannot be combined with "
                                 "regex, json_schema, ebnf or response_format")
            params["json_schema"] = json.dumps(
                forced_calls_schema(tools, name, single=not req.parallel_tool_calls))
        names = frozenset(t["function"]["name"] for t in tools)
        return tools, ToolMode(self.tool_call_parser, forced, names)

    async def create_chat_completion(self, body: Any, raw_request: Request) -> Response:
        try:
            req = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            return error_response(validation_error_message(exc))
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        try:
            params = req.sampling_params(max_tokens)
            tools, tool_mode = self._tool_mode(req, params)
            # A forced tool choice constrains the output to JSON from its first token.
            reasoning_parser = self.reasoning_parser \
                if req.separate_reasoning and not tool_mode.forced else None
            obj = GenerateReqInput(
                input_ids=self._chat_prompt_ids(req, tools),
                sampling_params=params, rid=req.rid,
                return_logprob=req.logprobs, top_logprobs_num=req.top_logprobs or 0,
                return_text_in_logprobs=True, stream=req.stream)
            prepared = self._prepare(obj, max_tokens)
        except ServerDeadError as exc:
            return error_response(str(exc), 503)
        except ValueError as exc:
            return error_response(str(exc))
        cid = f"chatcmpl-{prepared[0][0].rid}"
        created = int(time.time())
        model = self.tm.served_model_name

        def logprobs_of(meta: dict[str, Any]) -> Any:
            if not req.logprobs:
                return None
            return chat_logprobs(meta["output_token_logprobs"], meta.get("output_top_logprobs"))

        def finish_of(reason: dict[str, Any] | None, calls: list[ToolCall]) -> str | None:
            """OpenAI's finish_reason: "tool_calls" when the output ended in tool calls."""
            if calls and reason is not None and reason.get("type") == "stop":
                return "tool_calls"
            return finish_reason_str(reason)

        def render(outs: list[dict[str, Any]]) -> dict[str, Any]:
            choices = []
            for index, out in enumerate(outs):
                reason = out["meta_info"]["finish_reason"]
                reasoning, content, calls = split_chat_output(out["text"], reasoning_parser,
                                                              tool_mode)
                choices.append({
                    "index": index,
                    "message": {"role": "assistant",
                                "content": (content or None) if calls else content,
                                "reasoning_content": reasoning,
                                "tool_calls": [c.to_openai() for c in calls] or None},
                    "logprobs": logprobs_of(out["meta_info"]),
                    "finish_reason": finish_of(reason, calls),
                    "matched_stop": matched_stop(reason)})
            return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                    "choices": choices,
                    "usage": usage_of([o["meta_info"] for o in outs], obj.parallel_sample_num)}

        def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, reason: Any = None,
                  finish: str | None = None) -> str:
            return sse_data({"id": cid, "object": "chat.completion.chunk", "created": created,
                             "model": model, "choices": [{
                                 "index": index, "delta": delta, "logprobs": logprobs,
                                 "finish_reason": finish or finish_reason_str(reason),
                                 "matched_stop": matched_stop(reason)}]})

        async def stream(gen: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
            metas: dict[int, dict[str, Any]] = {}
            splitters: dict[int, ChatOutputStream] = {}
            try:
                yield chunk(0, {"role": "assistant", "content": ""})
                async for index, delta, out in self._events(gen):
                    if index not in splitters:
                        splitters[index] = ChatOutputStream(reasoning_parser, tool_mode)
                        if index:  # each choice opens with its role, as choice 0 did
                            yield chunk(index, {"role": "assistant", "content": ""})
                    meta = metas[index] = out["meta_info"]
                    reason = meta["finish_reason"]
                    logprobs = logprobs_of(meta)
                    reasoning, delta = splitters[index].feed(delta)
                    calls: list[ToolCall] = []
                    if reason is not None:
                        more_reasoning, rest, calls = splitters[index].finish()
                        reasoning, delta = reasoning + more_reasoning, delta + rest
                    message: dict[str, Any] = {"reasoning_content": reasoning} if reasoning else {}
                    if delta:
                        message["content"] = delta
                    if calls:
                        if message or (logprobs and logprobs["content"]):
                            yield chunk(index, message, logprobs)
                        yield chunk(index, {"tool_calls": [c.to_openai(i)
                                                           for i, c in enumerate(calls)]},
                                    None, reason, finish_of(reason, calls))
                    elif message or reason is not None or (logprobs and logprobs["content"]):
                        yield chunk(index, message, logprobs, reason)
                if req.include_usage and metas:
                    yield sse_data({"id": cid, "object": "chat.completion.chunk",
                                    "created": created, "model": model, "choices": [],
                                    "usage": usage_of([metas[i] for i in sorted(metas)],
                                                      obj.parallel_sample_num)})
            except ServerDeadError as exc:
                yield sse_data(error_body(str(exc), 503))
            yield SSE_DONE

        return await self._respond(obj, prepared, raw_request, render, stream)
