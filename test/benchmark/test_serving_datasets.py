"""The serving workloads: lengths, shared prefixes, grouping."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from serving.datasets import (ordinary_token_ids, random_lens,
                              sample_generated_shared_prefix_requests, sample_random_requests)

from sglang_chelsea.model_loader import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(default_model_path: str):  # type: ignore[no-untyped-def]
    return load_tokenizer(default_model_path)


def test_random_lens_follow_sglang_range_rule() -> None:
    rng = random.Random(0)
    assert random_lens(rng, 100, 1.0, 5) == [100] * 5
    lens = random_lens(rng, 100, 0.5, 500)
    assert min(lens) >= 50 and max(lens) <= 100 and len(set(lens)) > 20
    assert min(random_lens(rng, 10, 0.0, 200)) >= 1
    assert random_lens(rng, 0, 0.5, 3) == [0, 0, 0]


def test_vocabulary_pool_excludes_special_and_added_tokens(tokenizer) -> None:  # type: ignore[no-untyped-def]
    pool = set(ordinary_token_ids(tokenizer))
    assert not pool & set(tokenizer.all_special_ids)
    assert not pool & set(tokenizer.get_added_vocab().values())
    assert len(pool) > 40000


def test_random_requests_exact_lengths_with_ids(tokenizer) -> None:  # type: ignore[no-untyped-def]
    rows = sample_random_requests(tokenizer, 6, 40, 7, 1.0, seed=3, tokenize_prompt=True)
    assert [len(r.prompt) for r in rows] == [40] * 6 == [r.prompt_len for r in rows]
    assert all(r.output_len == 7 and r.group is None for r in rows)
    assert len({tuple(r.prompt) for r in rows}) == 6  # nothing shared
    again = sample_random_requests(tokenizer, 6, 40, 7, 1.0, seed=3, tokenize_prompt=True)
    assert [r.prompt for r in again] == [r.prompt for r in rows]


def test_random_text_prompt_len_is_its_token_count(tokenizer) -> None:  # type: ignore[no-untyped-def]
    rows = sample_random_requests(tokenizer, 3, 50, 5, 1.0, seed=0)
    for r in rows:
        assert isinstance(r.prompt, str)
        assert r.prompt_len == len(tokenizer.encode(r.prompt, add_special_tokens=False))


def test_shared_prefix_groups(tokenizer) -> None:  # type: ignore[no-untyped-def]
    rows = sample_generated_shared_prefix_requests(
        tokenizer, num_groups=3, prompts_per_group=4, system_prompt_len=64, question_len=8,
        output_len=5, seed=0, tokenize_prompt=True)
    assert len(rows) == 12
    assert Counter(r.group for r in rows) == {0: 4, 1: 4, 2: 4}
    assert [r.group for r in rows] != sorted(r.group for r in rows)  # shuffled
    by_group: dict[int, list[list[int]]] = {}
    for r in rows:
        assert r.prompt_len == len(r.prompt) == 72 and r.output_len == 5
        by_group.setdefault(r.group, []).append(r.prompt)  # type: ignore[arg-type]
    prefixes = {g: {tuple(p[:64]) for p in ps} for g, ps in by_group.items()}
    assert all(len(p) == 1 for p in prefixes.values())  # one system prompt per group
    assert len({next(iter(p)) for p in prefixes.values()}) == 3  # different across groups
    assert all(len({tuple(p[64:]) for p in ps}) == 4 for ps in by_group.values())


def test_shared_prefix_text_form_and_order(tokenizer) -> None:  # type: ignore[no-untyped-def]
    rows = sample_generated_shared_prefix_requests(
        tokenizer, 2, 3, 32, 4, 6, seed=1, ordered=True)
    assert [r.group for r in rows] == [0, 0, 0, 1, 1, 1]
    systems = {r.group: r.prompt.split("\n\n")[0] for r in rows}  # type: ignore[union-attr]
    assert all(r.prompt.startswith(systems[r.group] + "\n\n") for r in rows)  # type: ignore[union-attr]
    assert systems[0] != systems[1]
