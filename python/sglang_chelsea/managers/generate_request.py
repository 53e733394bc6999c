"""GenerateReqInput: SGLang's ``/generate`` request (single or batch), parsed and normalised.

Shared by the offline Engine and the TokenizerManager: a JSON body (or Engine keyword
arguments) becomes a list of per-prompt :class:`GenerateReqItem`, each tokenized into a
:class:`TokenizedGenerateReqInput` and checked by :func:`validate_tokenized_request`
before anything is queued. Every problem raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from sglang_chelsea.constrained import validate_grammar
from sglang_chelsea.managers.io_struct import TokenizedGenerateReqInput
from sglang_chelsea.sampling.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Top-level fields SGLang (or its router / bench scripts) may send that ask for a feature we
# lack: accepted when null, false or empty, rejected otherwise.
UNSUPPORTED_FIELDS = frozenset({
    "input_embeds", "image_data", "video_data", "audio_data", "session_params", "lora_path",
    "lora_id", "custom_logit_processor", "token_ids_logprob", "return_hidden_states",
    "return_routed_experts", "return_entropy", "return_bytes",
})
# Most (position, top token) logprob entries one request may ask for: top_logprobs_num times
# the positions with logprobs. Each entry becomes Python objects in three processes and JSON
# text, so a full-vocabulary top over a long prompt would exhaust the host's memory.
MAX_TOP_LOGPROB_ENTRIES = 1 << 22
# Most samples per prompt (``n``), as OpenAI's API allows.
MAX_PARALLEL_SAMPLES = 128
# Any other top-level field not parsed below (``model``, ``log_metrics``, ``background``,
# ``no_logs``, ``bootstrap_*``, ``data_parallel_rank``, ``priority``, ...) is accepted and ignored.


def _check_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"{name} must be a boolean, got {value!r}")


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"{name} must be an integer, got {value!r}")


def _is_id_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


@dataclass
class GenerateReqItem:
    """One prompt of a (possibly batched) generate request, with its own parameters."""

    text: str | None
    input_ids: list[int] | None
    sampling_params: SamplingParams
    rid: str
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    stream: bool = False

    def tokenize(self, tokenizer: Any, encoded: dict[str, list[int]] | None = None
                 ) -> TokenizedGenerateReqInput:
        """Encode the text (when given) and fill SGLang's logprob defaults.

        ``encoded`` (text -> ids), shared by one request's items, encodes each distinct text
        once (a prompt's ``n`` samples). ``logprob_start_len = -1`` (the default) means
        output logprobs only, as in SGLang.
        """
        if self.input_ids is None and tokenizer is None:
            raise ValueError("this server was started with --skip-tokenizer-init: send "
                             "input_ids, not text")
        if self.input_ids is not None:
            ids = list(self.input_ids)
        else:
            encoded = {} if encoded is None else encoded
            if self.text not in encoded:
                encoded[self.text] = tokenizer.encode(self.text)
            ids = list(encoded[self.text])
        self.sampling_params.normalize(tokenizer)
        start = self.logprob_start_len if self.return_logprob else -1
        return TokenizedGenerateReqInput(
            rid=self.rid, input_text=self.text, input_ids=ids,
            sampling_params=self.sampling_params, return_logprob=self.return_logprob,
            logprob_start_len=max(start, -1),
            top_logprobs_num=self.top_logprobs_num if self.return_logprob else 0,
            stream=self.stream)


@dataclass
class GenerateReqInput:
    """SGLang's ``/generate`` body: ``text`` or ``input_ids``, single or a batch (list).

    Per-prompt fields (``sampling_params``, ``rid``, ``return_logprob``, ``logprob_start_len``,
    ``top_logprobs_num``) are either one value for every prompt or a list with one per prompt.
    """

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    ignored_fields: list[str] = field(default_factory=list, repr=False)

    @classmethod
    def from_dict(cls, body: Any) -> GenerateReqInput:
        """Parse a JSON ``/generate`` body; raises ValueError naming the offending field."""
        if not isinstance(body, dict):
            raise ValueError(f"the request body must be a JSON object, got {type(body).__name__}")
        for name in UNSUPPORTED_FIELDS:
            if body.get(name):
                raise ValueError(f"{name} is not supported by this server")
        known = {f for f in cls.__dataclass_fields__ if f != "ignored_fields"}
        obj = cls(**{k: v for k, v in body.items() if k in known and v is not None})
        obj.ignored_fields = sorted(set(body) - known - UNSUPPORTED_FIELDS)
        if obj.ignored_fields:
            logger.debug("ignoring /generate fields %s", obj.ignored_fields)
        obj.check()
        return obj

    # ------------------------------------------------------------------ shape
    @property
    def is_single(self) -> bool:
        """True for one prompt (``text`` a string or ``input_ids`` a flat id list)."""
        if self.text is not None:
            return isinstance(self.text, str)
        ids = self.input_ids
        return not (isinstance(ids, list) and len(ids) > 0 and isinstance(ids[0], list))

    @property
    def batch_size(self) -> int:
        if self.is_single:
            return 1
        return len(self.text if self.text is not None else self.input_ids)  # type: ignore[arg-type]

    @property
    def parallel_sample_num(self) -> int:
        """``n`` of the sampling params: samples per prompt (the same for every prompt)."""
        params = self.sampling_params
        ns = {_check_int("n", 1 if p.get("n") is None else p["n"]) if isinstance(p, dict) else 1
              for p in (params if isinstance(params, list) else [params])}
        if len(ns) > 1:
            raise ValueError(f"n must be the same for every prompt of a batch, got {sorted(ns)}")
        n = ns.pop()
        if not 1 <= n <= MAX_PARALLEL_SAMPLES:
            raise ValueError(f"n must be in [1, {MAX_PARALLEL_SAMPLES}], got {n}")
        return n

    @property
    def returns_single(self) -> bool:
        """One response dict (one prompt, one sample); otherwise a list of ``batch_size x n``
        responses, prompt-major, as SGLang returns them."""
        return self.is_single and self.parallel_sample_num == 1

    def check(self) -> None:
        """Types and shapes of every field (ranges are checked per item later)."""
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("exactly one of text or input_ids is required")
        if self.text is not None and not isinstance(self.text, str):
            if not (isinstance(self.text, list) and all(isinstance(t, str) for t in self.text)):
                raise ValueError("text must be a string or a list of strings")
            if not self.text:
                raise ValueError("text must not be an empty list")
        if self.input_ids is not None:
            ids = self.input_ids
            if not isinstance(ids, list):
                raise ValueError("input_ids must be a list of token ids or a list of lists")
            if ids and isinstance(ids[0], list):
                if not all(_is_id_list(row) for row in ids):
                    raise ValueError("input_ids must be a list of lists of integer token ids")
            elif not _is_id_list(ids):
                raise ValueError("input_ids must be a list of integer token ids")
        self.stream = _check_bool("stream", self.stream)
        self.return_text_in_logprobs = _check_bool("return_text_in_logprobs",
                                                   self.return_text_in_logprobs)
        n = self.batch_size
        for name in ("sampling_params", "rid", "return_logprob", "logprob_start_len",
                     "top_logprobs_num"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
            if isinstance(value, list) and self.is_single:
                raise ValueError(f"{name} must not be a list for a single prompt")
        if isinstance(self.rid, str) and not self.is_single:
            raise ValueError("rid must be a list of strings for a batch of prompts")
        self.parallel_sample_num  # noqa: B018 (checks n)

    # ------------------------------------------------------------------ items
    def _per_item(self, name: str, i: int) -> Any:
        value = getattr(self, name)
        return value[i] if isinstance(value, list) else value

    def to_items(self) -> list[GenerateReqItem]:
        """One GenerateReqItem per prompt and sample (prompt-major), with parsed
        SamplingParams and a rid.

        With ``n > 1`` each prompt becomes ``n`` requests with ``n = 1``: rids ``{rid}_{j}``,
        and with a ``seed``, seeds ``seed + j``, so the samples differ and stay reproducible.
        Their common prompt is prefilled once and shared through the radix cache.
        """
        items = []
        texts = [self.text] if isinstance(self.text, str) else self.text
        ids = ([self.input_ids] if self.is_single else self.input_ids) \
            if self.input_ids is not None else None
        n = self.parallel_sample_num
        for i in range(self.batch_size):
            rid = self._per_item("rid", i)
            if rid is None:
                rid = uuid.uuid4().hex
            elif not isinstance(rid, str) or not rid:
                raise ValueError(f"rid must be a non-empty string, got {rid!r}")
            lp = _check_bool("return_logprob", self._per_item("return_logprob", i) or False)
            start = self._per_item("logprob_start_len", i)
            top = self._per_item("top_logprobs_num", i)
            top = 0 if top is None else _check_int("top_logprobs_num", top)
            if top < 0:
                raise ValueError(f"top_logprobs_num must be >= 0, got {top}")
            for j in range(n):
                params = SamplingParams.from_dict(self._per_item("sampling_params", i))
                params.n = 1
                if n > 1 and params.seed is not None:
                    params.seed += j
                items.append(GenerateReqItem(
                    text=texts[i] if texts is not None else None,
                    input_ids=list(ids[i]) if ids is not None else None,  # type: ignore[index]
                    sampling_params=params, rid=rid if n == 1 else f"{rid}_{j}",
                    return_logprob=lp,
                    logprob_start_len=-1 if start is None else _check_int("logprob_start_len",
                                                                          start),
                    top_logprobs_num=top, return_text_in_logprobs=self.return_text_in_logprobs,
                    stream=self.stream))
        if len({item.rid for item in items}) != len(items):
            raise ValueError("rid values must be unique")
        return items


def validate_tokenized_request(tokenized: TokenizedGenerateReqInput, vocab_size: int,
                               max_req_input_len: int, context_len: int) -> None:
    """Raise ValueError naming the problem with a tokenized request (before it is queued)."""
    ids = tokenized.input_ids
    if len(ids) == 0:
        raise ValueError("the prompt is empty (it has no tokens)")
    bad = [t for t in ids if not isinstance(t, int) or t < 0 or t >= vocab_size]
    if bad:
        raise ValueError(f"input_ids contains token id {bad[0]!r} outside the vocabulary "
                         f"[0, {vocab_size})")
    if len(ids) > max_req_input_len:
        raise ValueError(f"the prompt has {len(ids)} tokens, more than the maximum "
                         f"{max_req_input_len} (context length {context_len})")
    tokenized.sampling_params.verify(vocab_size)
    validate_grammar(tokenized.sampling_params)
    if tokenized.logprob_start_len >= len(ids):
        raise ValueError(f"logprob_start_len ({tokenized.logprob_start_len}) must be less "
                         f"than the prompt length ({len(ids)})")
    if tokenized.top_logprobs_num < 0:
        raise ValueError("top_logprobs_num must be >= 0")
    if tokenized.top_logprobs_num:
        prompt_positions, output_positions = _logprob_positions(tokenized, context_len)
        entries = tokenized.top_logprobs_num * (prompt_positions + output_positions)
        if entries > MAX_TOP_LOGPROB_ENTRIES:
            raise ValueError(
                f"top_logprobs_num ({tokenized.top_logprobs_num}) times the positions with "
                f"logprobs ({prompt_positions} of the prompt, up to {output_positions} output) "
                f"is more than {MAX_TOP_LOGPROB_ENTRIES} entries: ask for fewer top logprobs, "
                "a later logprob_start_len or fewer max_new_tokens")


def _logprob_positions(tokenized: TokenizedGenerateReqInput, context_len: int
                       ) -> tuple[int, int]:
    """(prompt positions, most output positions) that get logprobs."""
    ids = tokenized.input_ids
    prompt = len(ids) - tokenized.logprob_start_len if tokenized.logprob_start_len >= 0 else 0
    output = min(tokenized.sampling_params.max_new_tokens, context_len - len(ids))
    return prompt, max(output, 0)


def validate_request_budget(items: list[TokenizedGenerateReqInput], context_len: int) -> None:
    """Raise ValueError when a whole request (every prompt and sample together) asks for more
    than MAX_TOP_LOGPROB_ENTRIES top-logprob entries; each item alone is checked by
    :func:`validate_tokenized_request`."""
    total = sum(t.top_logprobs_num * sum(_logprob_positions(t, context_len))
                for t in items if t.top_logprobs_num)
    if total > MAX_TOP_LOGPROB_ENTRIES:
        raise ValueError(f"the request's prompts and samples together ask for {total} "
                         f"top-logprob entries, more than {MAX_TOP_LOGPROB_ENTRIES}: ask for "
                         "fewer top logprobs, samples (n) or prompts")
