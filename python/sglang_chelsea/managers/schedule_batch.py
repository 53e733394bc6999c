"""Req: one generation request's state inside the scheduler.

Two lengths are tracked apart (see docs/design.md):
- ``logical_len``: tokens whose KV has been computed (RoPE positions, API token counts);
- ``physical_len``: KV slots listed in the request's ``req_to_token`` row (attention order).
Without compression they are equal; a compressed chunk of C tokens occupies fewer slots.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from sglang_chelsea.constrained.matcher import GrammarMatcher
from sglang_chelsea.managers.io_struct import TokenizedGenerateReqInput, TokenLogprob
from sglang_chelsea.sampling.sampling_params import SamplingParams


class Req:
    """A request in the waiting queue, in prefill, or decoding."""

    def __init__(self, tokenized: TokenizedGenerateReqInput, eos_token_ids: list[int]) -> None:
        self.rid = tokenized.rid
        self.origin_input_text = tokenized.input_text
        self.origin_input_ids: list[int] = list(tokenized.input_ids)
        self.sampling_params: SamplingParams = tokenized.sampling_params
        self.return_logprob = tokenized.return_logprob
        self.logprob_start_len = tokenized.logprob_start_len
        self.top_logprobs_num = tokenized.top_logprobs_num
        self.stream = tokenized.stream
        self.eos_token_ids = set(eos_token_ids)
        self.output_ids: list[int] = []
        self.finished_reason: Optional[dict[str, Any]] = None
        self.to_abort: Optional[str] = None
        self.generator: Optional[torch.Generator] = None
        # regex / json_schema / ebnf: advanced by each sampled token, never by a re-prefill
        self.grammar: Optional[GrammarMatcher] = None
        # KV state
        self.req_pool_idx: Optional[int] = None
        self.logical_len = 0
        self.physical_len = 0
        self.page_lens: list[int] = []  # physical slots of each completed page in the row
        self.compressed_pages = 0  # leading pages of page_lens already compressed
        self.kv_policy_state: Any = None  # a KV policy's per-request data (ClusterKV index)
        # Leading pages that may enter the radix tree: all completed pages without
        # compression; only the compressed ones with it (set by the scheduler).
        self.shareable_pages = 0
        self.last_node: Any = None
        self.tree_len = 0  # logical tokens of the row owned by the radix tree (locked)
        self.tree_phys_len = 0
        self.extend_input_len = 0
        self.cached_tokens: Optional[int] = None
        # logprobs
        self.input_logprobs_done = not (self.return_logprob and self.logprob_start_len >= 0)
        self.input_token_logprobs: list[TokenLogprob] = []
        self.input_top_logprobs: list[Optional[list[tuple[float, int]]]] = []
        self.output_token_logprobs: list[TokenLogprob] = []
        self.output_top_logprobs: list[list[tuple[float, int]]] = []
        # streaming offsets
        self.sent_output_len = 0
        self.sent_input_logprobs = False
        self.num_retractions = 0

    # ------------------------------------------------------------------ tokens
    def seq_ids(self) -> list[int]:
        """Every token so far: the prompt then the generated tokens."""
        return self.origin_input_ids + self.output_ids

    def seq_len(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    def kv_token_ids(self) -> list[int]:
        """Tokens whose KV is in the row (the last generated token has none yet)."""
        return self.seq_ids()[: self.logical_len]

    def finished(self) -> bool:
        return self.finished_reason is not None

    def max_prefix_len(self) -> int:
        """The most tokens a radix hit may cover: logits are needed from there on."""
        limit = self.seq_len() - 1
        if not self.input_logprobs_done:
            limit = min(limit, self.logprob_start_len)
        return max(0, limit)

    # ------------------------------------------------------------------ finish checks
    def check_finished(self, max_seq_len: int, tokenizer: Any = None) -> None:
        """Set ``finished_reason`` if the last generated token ends the request (the
        sequence reaching ``max_seq_len`` tokens ends it with "length")."""
        if self.finished():
            return
        sp = self.sampling_params
        if self.to_abort is not None:
            self.finished_reason = {"type": "abort", "message": self.to_abort}
            return
        n_out = len(self.output_ids)
        if n_out >= sp.max_new_tokens:
            self.finished_reason = {"type": "length", "length": sp.max_new_tokens}
            return
        if n_out == 0:
            return
        last = self.output_ids[-1]
        if n_out >= sp.min_new_tokens:
            if (not sp.ignore_eos and last in self.eos_token_ids) or last in (sp.stop_token_ids or []):
                self.finished_reason = {"type": "stop", "matched": last}
                return
            if sp.stop_strs and tokenizer is not None:
                longest = max(len(s) for s in sp.stop_strs)
                tail = tokenizer.decode(self.output_ids[-(longest + 1):])
                for stop in sp.stop_strs:
                    if stop in tail:
                        self.finished_reason = {"type": "stop", "matched": stop}
                        return
        if self.grammar is not None and self.grammar.is_terminated():
            # The grammar is complete and admits no further token (SGLang would force an EOS
            # next; finishing now saves that step and leaves the text the same).
            self.finished_reason = {"type": "stop", "matched": None}
            return
        if self.seq_len() >= max_seq_len:
            self.finished_reason = {"type": "length", "length": n_out}

    # ------------------------------------------------------------------ KV bookkeeping
    def reset_kv_state(self) -> None:
        """Forget the KV row (after the cache released it): the request restarts prefill."""
        self.req_pool_idx = None
        self.logical_len = 0
        self.physical_len = 0
        self.page_lens = []
        self.compressed_pages = 0
        self.kv_policy_state = None
        self.shareable_pages = 0
        self.last_node = None
        self.tree_len = 0
        self.tree_phys_len = 0
        self.extend_input_len = 0

    def __repr__(self) -> str:
        return (f"Req(rid={self.rid}, in={len(self.origin_input_ids)}, out={len(self.output_ids)}, "
                f"L={self.logical_len}, P={self.physical_len})")
