"""Which grammar a request asks for, and its translation to an llguidance grammar.

A request names at most one of ``regex``, ``json_schema`` or ``ebnf`` (SGLang's sampling
params; the OpenAI ``response_format`` becomes a ``json_schema``). The pair (kind, text) is
the cache key of the compiled grammar.
"""

from __future__ import annotations

import json
from typing import NamedTuple, Optional

import llguidance
from llguidance.gbnf_to_lark import GbnfToLarkError, gbnf_to_lark

from sglang_chelsea.sampling.sampling_params import SamplingParams

GRAMMAR_KINDS = ("regex", "json_schema", "ebnf")


class GrammarSpec(NamedTuple):
    """A grammar as the request gave it: ``kind`` in GRAMMAR_KINDS, ``text`` its source."""

    kind: str
    text: str


def grammar_spec(params: SamplingParams) -> Optional[GrammarSpec]:
    """The grammar ``params`` asks for, or None for unconstrained decoding."""
    for kind in GRAMMAR_KINDS:
        text = getattr(params, kind)
        if text is not None:
            return GrammarSpec(kind, text)
    return None


def to_llguidance(spec: GrammarSpec) -> str:
    """The llguidance grammar (a serialized grammar string) for ``spec``.

    Raises ValueError for a ``json_schema`` that is not a JSON object. Other problems
    (a bad regex, an unknown schema keyword, an EBNF syntax error) are found by
    :func:`llguidance.LLMatcher.validate_grammar`.
    """
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.text)
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"json_schema is not valid JSON: {exc}") from None
        except RecursionError:
            raise ValueError("json_schema is nested too deeply") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("json_schema must be a JSON object")
        # Compact JSON (no free whitespace): a small model left free to add whitespace may
        # spend its whole token budget on newlines.
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False})
    if spec.kind == "ebnf":
        # SGLang's ebnf is GBNF (``root ::= ...``); llguidance reads Lark.
        try:
            lark = gbnf_to_lark(spec.text)
        except GbnfToLarkError as exc:
            raise ValueError(f"invalid ebnf: {exc}") from None
        except RecursionError:
            raise ValueError("invalid ebnf: nested too deeply") from None
        except Exception as exc:  # the converter raises bare Exceptions (an undefined rule...)
            raise ValueError(f"invalid ebnf: {exc}") from None
        return llguidance.LLMatcher.grammar_from_lark(lark)
    raise ValueError(f"unknown grammar kind {spec.kind!r}")
