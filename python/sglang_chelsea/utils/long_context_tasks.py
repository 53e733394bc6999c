"""Synthetic long-context tasks shared by the tests and the benchmarks."""

from __future__ import annotations

from typing import Any

PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again. ")
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about the important information there. ")
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(tokenizer: Any, key: int, total_tokens: int, depth: float) -> str:
    """The plain passkey prompt (no chat template), about ``total_tokens`` tokens long,
    with the needle at relative ``depth`` (0 = start, 1 = end) of the filler."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    per = len(tokenizer.encode(PASSKEY_FILLER))
    budget = total_tokens - len(tokenizer.encode(PASSKEY_INTRO + needle + PASSKEY_QUESTION))
    n = max(1, budget // per)
    before = int(n * depth)
    return (PASSKEY_INTRO + PASSKEY_FILLER * before + needle + PASSKEY_FILLER * (n - before)
            + PASSKEY_QUESTION)
