"""ReqState: a request's accumulated outputs, rendered as SGLang's response dict."""

from __future__ import annotations

import time
from typing import Any, Optional

from sglang_chelsea.managers.io_struct import ReqOutput, TokenLogprob
from sglang_chelsea.managers.output_format import (
    build_meta_info,
    decode_output,
    format_token_logprobs,
    format_top_logprobs,
)
from sglang_chelsea.sampling.sampling_params import SamplingParams


class ReqState:
    """Collects the ReqOutputs of one request (token ids, logprobs, finish reason)."""

    def __init__(self, rid: str, sampling_params: SamplingParams, return_logprob: bool = False,
                 top_logprobs_num: int = 0, return_text_in_logprobs: bool = False) -> None:
        self.rid = rid
        self.sampling_params = sampling_params
        self.return_logprob = return_logprob
        self.top_logprobs_num = top_logprobs_num
        self.return_text_in_logprobs = return_text_in_logprobs
        self.created_time = time.perf_counter()
        self.output_ids: list[int] = []
        self.finished_reason: Optional[dict[str, Any]] = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.input_token_logprobs: list[TokenLogprob] = []
        self.input_top_logprobs: list[Any] = []
        self.output_token_logprobs: list[TokenLogprob] = []
        self.output_top_logprobs: list[Any] = []
        self.streamed_output_logprobs = 0  # output logprobs sent by incremental responses

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    def update(self, out: ReqOutput) -> None:
        self.output_ids.extend(out.new_output_ids)
        self.finished_reason = out.finished_reason
        self.prompt_tokens = out.prompt_tokens
        self.completion_tokens = out.completion_tokens
        self.cached_tokens = out.cached_tokens
        if out.input_token_logprobs is not None:
            self.input_token_logprobs = list(out.input_token_logprobs)
        if out.input_top_logprobs is not None:
            self.input_top_logprobs = list(out.input_top_logprobs)
        if out.output_token_logprobs:
            self.output_token_logprobs.extend(out.output_token_logprobs)
        if out.output_top_logprobs:
            self.output_top_logprobs.extend(out.output_top_logprobs)

    def text(self, tokenizer: Any) -> str:
        return decode_output(tokenizer, self.output_ids, self.finished_reason, self.sampling_params)

    def to_response(self, tokenizer: Any, text: Optional[str] = None,
                    incremental: bool = False) -> dict[str, Any]:
        """SGLang's ``{"text", "output_ids", "meta_info"}`` for the outputs so far.

        ``incremental`` (streaming, as SGLang streams): ``output_token_logprobs`` and
        ``output_top_logprobs`` hold only the tokens new since the previous incremental
        response; ``output_token_logprobs_length`` counts them all.
        """
        logprobs = None
        if self.return_logprob:
            rt = self.return_text_in_logprobs
            start = self.streamed_output_logprobs if incremental else 0
            if incremental:
                self.streamed_output_logprobs = len(self.output_token_logprobs)
            logprobs = {
                "input_token_logprobs": format_token_logprobs(self.input_token_logprobs,
                                                              tokenizer, rt),
                "output_token_logprobs": format_token_logprobs(self.output_token_logprobs[start:],
                                                               tokenizer, rt),
                "output_token_logprobs_length": len(self.output_token_logprobs),
            }
            if self.top_logprobs_num:
                logprobs["input_top_logprobs"] = format_top_logprobs(self.input_top_logprobs,
                                                                     tokenizer, rt)
                logprobs["output_top_logprobs"] = format_top_logprobs(
                    self.output_top_logprobs[start:], tokenizer, rt)
        meta = build_meta_info(self.rid, self.finished_reason, self.prompt_tokens,
                               self.completion_tokens, self.cached_tokens,
                               time.perf_counter() - self.created_time, logprobs)
        return {"text": self.text(tokenizer) if text is None else text,
                "output_ids": list(self.output_ids), "meta_info": meta}
