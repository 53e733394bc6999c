"""Typed messages passed between TokenizerManager, Scheduler and DetokenizerManager."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from sglang_chelsea.sampling.sampling_params import SamplingParams

# (logprob or None, token_id); top lists are per position: list of (logprob, token_id)
TokenLogprob = tuple[Optional[float], int]


@dataclass
class TokenizedGenerateReqInput:
    """A validated, tokenized generation request, as the scheduler receives it."""

    rid: str
    input_text: Optional[str]
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: no input logprobs; k: input logprobs from position k on
    top_logprobs_num: int = 0
    stream: bool = False


@dataclass
class ReqOutput:
    """One request's progress after one scheduler step (token ids only)."""

    rid: str
    new_output_ids: list[int]  # tokens generated since this request's previous ReqOutput
    finished_reason: Optional[dict[str, Any]]  # None while running; else SGLang's dict
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    # Sent once (with the first ReqOutput of the request) when input logprobs were asked for.
    input_token_logprobs: Optional[list[TokenLogprob]] = None
    input_top_logprobs: Optional[list[Optional[list[tuple[float, int]]]]] = None
    # For new_output_ids, when return_logprob.
    output_token_logprobs: Optional[list[TokenLogprob]] = None
    output_top_logprobs: Optional[list[list[tuple[float, int]]]] = None


@dataclass
class BatchTokenIDOutput:
    """Scheduler -> detokenizer: the outputs of one step."""

    outputs: list[ReqOutput] = field(default_factory=list)
    # Per output: the request's SamplingParams with its first output (the detokenizer needs
    # skip_special_tokens and the stop strings), None afterwards.
    sampling_params: list[Optional[SamplingParams]] = field(default_factory=list)


@dataclass
class BatchStrOutput:
    """Detokenizer -> tokenizer manager: outputs with their cumulative text."""

    outputs: list[ReqOutput] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # cumulative output text per output


@dataclass
class AbortReq:
    rid: str
    message: str = "aborted by request"


@dataclass
class FlushCacheReq:
    call_id: int = 0  # echoed in the reply, so a late reply to a timed-out call is dropped


@dataclass
class FlushCacheReqOutput:
    success: bool
    message: str = ""
    call_id: int = 0


@dataclass
class GetInternalStateReq:
    call_id: int = 0


@dataclass
class GetInternalStateReqOutput:
    state: dict[str, Any]
    call_id: int = 0
