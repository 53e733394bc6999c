"""Grammar-constrained decoding (regex, JSON schema, EBNF) with llguidance.

``GrammarBackend`` validates a request's grammar and makes a per-request
``GrammarMatcher``; ``bitmask`` turns the matchers' token bitmasks into a logits mask.
"""

from sglang_chelsea.constrained.grammar_backend import GrammarBackend, validate_grammar
from sglang_chelsea.constrained.grammar_spec import GrammarSpec, grammar_spec
from sglang_chelsea.constrained.matcher import GrammarMatcher

__all__ = ["GrammarBackend", "GrammarMatcher", "GrammarSpec", "grammar_spec", "validate_grammar"]
