"""Turning logits into tokens and logprobs for the scheduler's requests."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from sglang_chelsea.constrained.bitmask import allocate_bitmask, bitmask_to_allowed
from sglang_chelsea.managers.schedule_batch import Req
from sglang_chelsea.sampling.penalties import min_new_tokens_banned_ids
from sglang_chelsea.sampling.sampler import (SampleOutput, SamplingBatchInfo, compute_top_logprobs,
                                             logprobs_of)

if TYPE_CHECKING:
    from sglang_chelsea.managers.scheduler import Scheduler


def sample_batch(scheduler: "Scheduler", reqs: list[Req], logits: torch.Tensor) -> None:
    """Sample one token for each request from ``logits [B, V]``, record logprobs, check finish."""
    vocab = scheduler.model_config.vocab_size
    logits = logits[:, :vocab]
    params = [r.sampling_params for r in reqs]
    info = SamplingBatchInfo.from_params(params, [r.generator for r in reqs], vocab)
    banned = [min_new_tokens_banned_ids(r.sampling_params, len(r.output_ids), scheduler.eos_token_ids)
              for r in reqs]
    allowed, end_ids = grammar_masks(reqs, vocab, banned)
    any_logprob = any(r.return_logprob for r in reqs)
    tops = [r.top_logprobs_num if r.return_logprob else 0 for r in reqs]
    if (logits.device.type != "cpu" and info.is_all_greedy and not any_logprob
            and not info.need_penalties and info.logit_bias is None and not any(banned)
            and allowed is None):
        # Plain greedy on a GPU: only the argmax crosses to the host, not [B, V] logits.
        out = SampleOutput(logits.argmax(dim=-1), None, None)
    else:
        out = scheduler.sampler(
            logits.cpu(), info,
            output_ids=[r.output_ids for r in reqs] if info.need_penalties else None,
            banned_ids=banned if any(banned) else None,
            return_logprob=any_logprob, top_logprobs_nums=tops if any(tops) else None,
            allowed=allowed, end_token_ids=end_ids)
    next_ids = out.next_token_ids.tolist()
    chosen = out.logprobs.tolist() if out.logprobs is not None else None
    for i, (req, tok) in enumerate(zip(reqs, next_ids)):
        req.output_ids.append(tok)
        if req.grammar is not None and not req.grammar.accept_token(tok):
            req.to_abort = f"constrained decoding failed: {req.grammar.error()}"
        if req.return_logprob and chosen is not None:
            req.output_token_logprobs.append((chosen[i], tok))
            if req.top_logprobs_num and out.top_logprobs is not None:
                req.output_top_logprobs.append(out.top_logprobs[i])
        req.check_finished(scheduler.max_seq_len, scheduler.tokenizer)


def grammar_masks(reqs: list[Req], vocab_size: int, banned: list[list[int]]
                  ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """For the requests' grammars: the bool ``[B, vocab_size]`` mask of tokens allowed next
    (all tokens on unconstrained rows) and the ``[B]`` end-of-sequence id each complete
    grammar may end with now (-1 where none: unconstrained, incomplete, EOS banned by
    min_new_tokens, or ignore_eos). ``(None, None)`` when no request has a grammar."""
    if all(r.grammar is None for r in reqs):
        return None, None
    bitmask = allocate_bitmask(len(reqs), vocab_size)
    for i, req in enumerate(reqs):
        if req.grammar is not None:
            # The matcher has seen every generated token exactly once (a retracted request
            # re-prefills its tokens without passing them to the matcher again).
            assert req.grammar.num_accepted == len(req.output_ids), (req.rid, "grammar out of step")
            req.grammar.fill_bitmask(bitmask, i)
    allowed = bitmask_to_allowed(bitmask, vocab_size)
    ends = [-1] * len(reqs)
    for i, req in enumerate(reqs):
        if req.grammar is None or req.sampling_params.ignore_eos:
            continue
        ends[i] = next((t for t in sorted(req.eos_token_ids)
                        if t < vocab_size and allowed[i, t] and t not in banned[i]), -1)
    return allowed, torch.tensor(ends, dtype=torch.long)


def collect_input_logprobs(req: Req, logits: Optional[torch.Tensor], chunk_start: int) -> None:
    """Record input-token logprobs from an extend chunk starting at logical ``chunk_start``.

    ``logits[j]`` are the logits at position ``max(chunk_start, logprob_start_len) + j``,
    predicting the next prompt token. The first entry (token ``logprob_start_len``) has no
    logprob (null), as SGLang reports it. ``logits=None`` marks the prompt as complete.
    """
    start = req.logprob_start_len
    prompt = req.origin_input_ids
    if not req.input_token_logprobs:
        req.input_token_logprobs.append((None, prompt[start]))
        req.input_top_logprobs.append(None)
    if logits is None:
        req.input_logprobs_done = True
        return
    first = max(chunk_start, start)
    targets = torch.tensor(prompt[first + 1:first + 1 + logits.shape[0]], dtype=torch.int64)
    values = logprobs_of(logits, targets).tolist()
    req.input_token_logprobs.extend(zip(values, targets.tolist()))
    if req.top_logprobs_num:
        req.input_top_logprobs.extend(
            compute_top_logprobs(torch.log_softmax(logits.float(), dim=-1), req.top_logprobs_num))
