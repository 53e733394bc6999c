"""The grammar layer alone: validation messages, the compiled-grammar cache, matchers and
bitmasks, on the default model's tokenizer."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from sglang_chelsea.constrained import GrammarBackend, GrammarSpec, grammar_spec, validate_grammar
from sglang_chelsea.constrained.bitmask import allocate_bitmask, bitmask_to_allowed
from sglang_chelsea.constrained.grammar_cache import LRUCache
from sglang_chelsea.model_loader import load_tokenizer
from sglang_chelsea.sampling.sampling_params import SamplingParams

EOS = 2


@pytest.fixture(scope="module")
def tokenizer(default_model_path: str) -> Any:
    return load_tokenizer(default_model_path)


@pytest.fixture(scope="module")
def backend(tokenizer: Any) -> GrammarBackend:
    return GrammarBackend(tokenizer, len(tokenizer), [EOS])


def allowed_texts(backend: GrammarBackend, tokenizer: Any, matcher: Any) -> set[str]:
    bitmask = allocate_bitmask(1, backend.vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    ids = bitmask_to_allowed(bitmask, backend.vocab_size)[0].nonzero().flatten().tolist()
    return {tokenizer.decode([i]) for i in ids}


@pytest.mark.parametrize("params,message", [
    ({"regex": "(ab"}, "invalid regex.*unclosed group"),
    ({"regex": "a{3,1}"}, "invalid regex"),
    ({"json_schema": '{"type": "foo"}'}, "invalid json_schema.*foo"),
    ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
    ({"json_schema": "[1, 2]"}, "json_schema must be a JSON object"),
    ({"json_schema": {"$ref": "#/defs/missing"}}, "invalid json_schema"),
    ({"ebnf": 'root ::= "a'}, "invalid ebnf"),
    ({"ebnf": "root ::= x"}, "invalid ebnf.*'x'"),  # the converter raises bare Exceptions
    ({"ebnf": 'foo ::= "a"'}, "invalid ebnf.*root"),
    ({"ebnf": "root ::= " + "(" * 3000 + '"a"' + ")" * 3000}, "invalid ebnf"),
    ({"json_schema": "[" * 5000}, "json_schema is nested too deeply"),
    # valid, but llguidance's lexer runs out of expressions at the first byte
    ({"regex": "a{1000000}"}, "invalid regex: too complex to follow.*too many expressions"),
])
def test_invalid_grammars_name_the_problem(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_grammar(SamplingParams.from_dict(params))


def test_grammar_spec_and_json_schema_objects() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    params = SamplingParams.from_dict({"json_schema": schema})
    assert json.loads(params.json_schema) == schema  # an object is accepted and serialized
    assert grammar_spec(params) == GrammarSpec("json_schema", json.dumps(schema))
    assert grammar_spec(SamplingParams()) is None
    validate_grammar(params)
    validate_grammar(SamplingParams(ebnf='root ::= "yes" | "no"'))


def test_compiled_grammars_are_cached_and_matchers_independent(backend: GrammarBackend,
                                                                tokenizer: Any) -> None:
    params = SamplingParams(regex="(yes|no)")
    hits = backend.cache.hits
    first = backend.create_matcher(params)
    second = backend.create_matcher(params)
    assert backend.cache.hits == hits + 1
    assert first is not None and second is not None
    assert allowed_texts(backend, tokenizer, first) >= {"yes", "no", "y", "n"}
    for tok in tokenizer.encode("yes"):
        assert first.accept_token(tok)
    assert first.is_terminated() and first.num_accepted == len(tokenizer.encode("yes"))
    assert not second.is_terminated() and second.num_accepted == 0  # untouched by the first
    assert backend.create_matcher(SamplingParams()) is None


def test_matcher_masks_follow_the_regex_and_reject_other_tokens(backend: GrammarBackend,
                                                                tokenizer: Any) -> None:
    matcher = backend.create_matcher(SamplingParams(regex=r"[0-9]+"))
    assert matcher is not None
    texts = allowed_texts(backend, tokenizer, matcher)
    assert "7" in texts and " hours" not in texts and "<|im_end|>" not in texts
    assert matcher.accept_token(tokenizer.encode("7")[0])
    assert "<|im_end|>" in allowed_texts(backend, tokenizer, matcher)  # complete: may end
    assert not matcher.accept_token(tokenizer.encode(" hours")[0])
    assert matcher.error() is not None and "hours" in matcher.error()


def test_bitmask_expansion_matches_the_bits() -> None:
    vocab = 70
    bitmask = allocate_bitmask(2, vocab)
    assert bitmask.shape == (2, 3) and bitmask_to_allowed(bitmask, vocab).all()
    bitmask.zero_()
    allowed = [[0, 31, 32, 69], [5, 63, 64]]
    for row, ids in enumerate(allowed):
        for t in ids:
            word = bitmask[row, t // 32].item() | (1 << (t % 32))
            bitmask[row, t // 32] = word - (1 << 32) if word >= 1 << 31 else word
    got = bitmask_to_allowed(bitmask, vocab)
    assert got.shape == (2, vocab) and got.dtype == torch.bool
    assert [row.nonzero().flatten().tolist() for row in got] == allowed


def test_lru_cache_evicts_the_least_recently_used() -> None:
    cache: LRUCache[int] = LRUCache(2)
    assert cache.get_or_create("a", lambda: 1) == 1
    assert cache.get_or_create("b", lambda: 2) == 2
    assert cache.get_or_create("a", lambda: 99) == 1  # hit; "b" is now the oldest
    cache.get_or_create("c", lambda: 3)
    assert "a" in cache and "c" in cache and "b" not in cache
    assert (cache.hits, cache.misses, len(cache)) == (1, 3, 2)
    with pytest.raises(ValueError):
        cache.get_or_create("d", lambda: (_ for _ in ()).throw(ValueError("bad")))
    assert "d" not in cache
