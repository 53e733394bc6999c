"""GrammarBackend: validates grammars and makes per-request matchers, with compiled grammars
cached by (kind, text).

llguidance builds a grammar's parser in well under a millisecond and computes token masks
lazily (see docs/structured-outputs.md for the measurements behind the choice), so the
"compiled grammar" kept here is a fresh LLMatcher that each request deep-copies.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Optional

import llguidance
import llguidance.hf

from sglang_chelsea.constrained.grammar_cache import LRUCache
from sglang_chelsea.constrained.grammar_spec import GrammarSpec, grammar_spec, to_llguidance
from sglang_chelsea.constrained.matcher import GrammarMatcher
from sglang_chelsea.sampling.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 256

_validated: LRUCache[bool] = LRUCache(DEFAULT_CACHE_SIZE)


def _one_line(error: str) -> str:
    """llguidance's message without its source excerpt: the first line and ``error:`` lines."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    return " ".join(lines[:1] + [line for line in lines[1:] if line.startswith("error:")])


def _check(spec: GrammarSpec, tokenizer: Optional[llguidance.LLTokenizer]) -> str:
    """The llguidance grammar of ``spec``; ValueError naming the problem when it is invalid."""
    grammar = to_llguidance(spec)
    error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    if error:
        raise ValueError(f"invalid {spec.kind}: {_one_line(error)}")
    return grammar


class _ByteVocabulary:
    """A vocabulary of the 256 single bytes plus an end token, for dry runs of a grammar."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([b]) for b in range(256)] + [b""]
    special_token_ids = [256]

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


_byte_tokenizer: Optional[llguidance.LLTokenizer] = None


def byte_tokenizer() -> llguidance.LLTokenizer:
    """llguidance's tokenizer over single bytes (token id = byte, 256 = end), built once."""
    global _byte_tokenizer
    if _byte_tokenizer is None:
        _byte_tokenizer = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_ByteVocabulary()), slices=[])
    return _byte_tokenizer


def _dry_run(spec: GrammarSpec, grammar: str) -> None:
    """Follow ``grammar`` for one byte; ValueError if llguidance hits a limit doing so.

    Some grammars pass validation but exceed the lexer's limits at the first token (a regex
    like ``a{1000000}``: "too many expressions constructed"); this finds them before the
    request is queued instead of aborting it after one token.
    """
    matcher = llguidance.LLMatcher(byte_tokenizer(), grammar, log_level=0)
    if not matcher.is_error():
        words = memoryview(matcher.compute_bitmask()).cast("I")
        allowed = next((t for t in range(256) if words[t // 32] >> (t % 32) & 1), None)
        if allowed is not None:
            matcher.consume_token(allowed)
    if matcher.is_error():
        raise ValueError(f"invalid {spec.kind}: too complex to follow "
                         f"({_one_line(matcher.get_error())})")


def validate_grammar(params: SamplingParams) -> None:
    """Raise ValueError if the request's regex / json_schema / ebnf is invalid.

    Needs no model tokenizer (cheap, for the tokenizer manager): the grammar is checked, then
    followed for one byte (:func:`_dry_run`); results are cached per grammar.
    """
    spec = grammar_spec(params)
    if spec is not None:
        _validated.get_or_create(spec, lambda: _validate(spec))


def _validate(spec: GrammarSpec) -> bool:
    try:
        _dry_run(spec, _check(spec, None))
    except RecursionError:
        raise ValueError(f"invalid {spec.kind}: nested too deeply") from None
    return True


class GrammarBackend:
    """Makes GrammarMatchers for the scheduler (one backend per model/tokenizer)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int],
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.cache: LRUCache[llguidance.LLMatcher] = LRUCache(cache_size)
        self._ll_tokenizer: Optional[llguidance.LLTokenizer] = None

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary, built on first use (about 0.3 s)."""
        if self._ll_tokenizer is None:
            try:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_token_ids)
            except Exception as exc:  # e.g. a slow (Python) tokenizer without a backend
                raise ValueError(f"constrained decoding is not available for this tokenizer: "
                                 f"{exc}") from None
        return self._ll_tokenizer

    def create_matcher(self, params: SamplingParams) -> Optional[GrammarMatcher]:
        """A matcher at the start of the request's grammar, or None when it has none.

        Raises ValueError when the grammar is invalid.
        """
        spec = grammar_spec(params)
        if spec is None:
            return None
        compiled = self.cache.get_or_create(spec, lambda: self._compile(spec))
        return GrammarMatcher(compiled.deep_copy())

    def _compile(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        grammar = _check(spec, self.ll_tokenizer)
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid {spec.kind}: {_one_line(matcher.get_error())}")
        logger.debug("compiled %s grammar (%d cached)", spec.kind, len(self.cache) + 1)
        return matcher
