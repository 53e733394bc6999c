"""SGLang's response shapes: output text with stop trimming, logprob lists, meta_info."""

from __future__ import annotations

from typing import Any, Optional

from sglang_chelsea.managers.io_struct import TokenLogprob
from sglang_chelsea.sampling.sampling_params import SamplingParams


def ids_for_text(output_ids: list[int], finished_reason: Optional[dict],
                 sp: SamplingParams) -> list[int]:
    """The output ids whose text is shown: a matched stop token id is not shown."""
    if (finished_reason and finished_reason.get("type") == "stop"
            and isinstance(finished_reason.get("matched"), int) and not sp.no_stop_trim
            and output_ids):
        return output_ids[:-1]
    return output_ids


def trim_stop_str(text: str, finished_reason: Optional[dict], sp: SamplingParams) -> str:
    """Cut the text at a matched stop string (SGLang drops the stop string itself)."""
    if (finished_reason and finished_reason.get("type") == "stop"
            and isinstance(finished_reason.get("matched"), str) and not sp.no_stop_trim):
        pos = text.find(finished_reason["matched"])
        if pos != -1:
            return text[:pos]
    return text


def decode_output(tokenizer: Any, output_ids: list[int], finished_reason: Optional[dict],
                  sp: SamplingParams) -> str:
    """The full output text of a request, as SGLang returns it ("" without a tokenizer,
    ``--skip-tokenizer-init``: the caller reads ``output_ids``)."""
    if tokenizer is None:
        return ""
    text = tokenizer.decode(ids_for_text(output_ids, finished_reason, sp),
                            skip_special_tokens=sp.skip_special_tokens,
                            spaces_between_special_tokens=sp.spaces_between_special_tokens)
    return trim_stop_str(text, finished_reason, sp)


def format_token_logprobs(pairs: list[TokenLogprob], tokenizer: Any,
                          return_text: bool) -> list[list[Any]]:
    """``[(logprob, id)]`` -> SGLang's ``[[logprob, id, text or None]]``."""
    show = return_text and tokenizer is not None
    return [[lp, tid, tokenizer.decode([tid]) if show else None] for lp, tid in pairs]


def format_top_logprobs(tops: list[Optional[list[tuple[float, int]]]], tokenizer: Any,
                        return_text: bool) -> list[Optional[list[list[Any]]]]:
    return [None if top is None else format_token_logprobs(top, tokenizer, return_text)
            for top in tops]


def build_meta_info(rid: str, finished_reason: Optional[dict], prompt_tokens: int,
                    completion_tokens: int, cached_tokens: int, e2e_latency: float,
                    logprobs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """SGLang's ``meta_info`` dict."""
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": finished_reason,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cached_tokens": cached_tokens,
        "e2e_latency": e2e_latency,
    }
    if logprobs:
        meta.update(logprobs)
    return meta
