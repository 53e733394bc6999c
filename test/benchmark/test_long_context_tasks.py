"""The synthetic long-context prompt builders hold the answer they claim."""

from __future__ import annotations

import random
import re

import pytest

from sglang_chelsea.model_loader import load_tokenizer
from sglang_chelsea.utils.long_context_tasks import (TaskCase, multikey_needle_case,
                                                     passkey_prompt, variable_tracking_case)


@pytest.fixture(scope="module")
def tokenizer(default_model_path: str):  # type: ignore[no-untyped-def]
    return load_tokenizer(default_model_path)


def test_passkey_length_and_depth(tokenizer) -> None:  # type: ignore[no-untyped-def]
    early, late = (passkey_prompt(tokenizer, 31337, 1024, d) for d in (0.1, 0.9))
    for p in (early, late):
        assert 1024 - 64 <= len(tokenizer.encode(p)) <= 1024  # whole filler sentences
        assert p.count("31337") == 2 and p.endswith("The pass key is")
    assert early.index("31337") < len(early) * 0.2 < len(late) * 0.8 < late.index("31337")


def test_multikey_needle_asks_one_of_its_needles(tokenizer) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    for _ in range(5):
        case = multikey_needle_case(tokenizer, rng, 1024, num_needles=4)
        needles = dict(re.findall(r"The special magic number for (\w+) is (\d+)\. ", case.prompt))
        assert len(needles) == 4 and len(set(needles.values())) == 4
        asked = re.search(r"What is the special magic number for (\w+)\?", case.prompt).group(1)
        assert case.answers == [needles[asked]]
        assert case.prompt.endswith(f"The special magic number for {asked} is")
        assert len(tokenizer.encode(case.prompt)) <= 1024
        positions = [case.prompt.index(f"for {k} is {v}") for k, v in needles.items()]
        assert max(positions) - min(positions) > len(case.prompt) / 2  # spread out


def test_variable_tracking_chain(tokenizer) -> None:  # type: ignore[no-untyped-def]
    case = variable_tracking_case(tokenizer, random.Random(1), 1024, num_hops=3)
    names = case.answers
    assert len(names) == 4 and len(set(names)) == 4
    value = re.search(rf"VAR {names[0]} = (\d+)\. ", case.prompt).group(1)
    hops = [case.prompt.index(f"VAR {names[i]} = VAR {names[i - 1]}. ") for i in range(1, 4)]
    assert case.prompt.index(f"VAR {names[0]} = {value}") < hops[0] < hops[1] < hops[2]
    assert case.prompt.endswith(f"4 variables are assigned the value {value}, they are:")
    assert case.score(f" {names[0]}, {names[2]}") == pytest.approx(0.5)


def test_score_is_the_share_of_answers_found() -> None:
    case = TaskCase("p", ["123", "456"], 4)
    assert case.score("no") == 0.0 and case.score("123!") == 0.5 and case.score("456 123") == 1.0
