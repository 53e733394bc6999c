"""Synthetic long-context tasks shared by the tests and the benchmarks.

Every prompt is plain text (no chat template): an intro, filler sentences with the task's
statements ("needles") at given depths, and a question whose answer the model completes.
- passkey: one number to retrieve;
- multi-key needle (RULER's niah_multikey): several "special magic number for KEY"
  needles, one key asked;
- variable tracking (RULER's vt, one-shot like RULER's): a chain ``VAR A = N``,
  ``VAR B = VAR A``, ... spread through the filler; the model must list every variable
  holding N (scored by the share of the chain's names in the answer).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again. ")
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about the important information there. ")
PASSKEY_QUESTION = "What is the pass key? The pass key is"
NEEDLE_INTRO = ("Some special magic numbers are hidden inside the following text. Make sure to "
                "memorize them. I will quiz you about the numbers afterwards. ")
VT_INTRO = ("Memorize and track the chain of variable assignments hidden in the following "
            "text. Example: in 'VAR QPTRS = 31415. ... VAR KLMNO = VAR QPTRS. ... VAR ZXCVB = VAR "
            "KLMNO.', the variables assigned the value 31415 are: QPTRS, KLMNO, ZXCVB. ")
NEEDLE_KEYS = ("apple", "river", "candle", "falcon", "marble", "violin", "harbor", "pepper",
               "lantern", "meadow", "copper", "glacier", "orchid", "saddle", "thunder", "walnut")


@dataclass
class TaskCase:
    """A prompt, the strings a correct answer contains, and how many tokens to generate."""

    prompt: str
    answers: list[str]
    max_new_tokens: int

    def score(self, output: str) -> float:
        """Fraction of the expected answers found in ``output``."""
        return sum(a in output for a in self.answers) / len(self.answers)


def haystack(tokenizer: Any, intro: str, needles: list[tuple[float, str]], question: str,
             total_tokens: int) -> str:
    """``intro`` + filler of about ``total_tokens`` tokens in all, with each needle
    ``(depth, text)`` inserted at relative ``depth`` (0 = start, 1 = end), + ``question``."""
    per = len(tokenizer.encode(PASSKEY_FILLER))
    fixed = intro + "".join(text for _, text in needles) + question
    n = max(1, (total_tokens - len(tokenizer.encode(fixed))) // per)
    parts, done = [intro], 0
    for depth, text in sorted(needles, key=lambda d: d[0]):
        at = min(n, max(done, int(n * depth)))
        parts += [PASSKEY_FILLER * (at - done), text]
        done = at
    parts += [PASSKEY_FILLER * (n - done), question]
    return "".join(parts)


def passkey_prompt(tokenizer: Any, key: int, total_tokens: int, depth: float) -> str:
    """The plain passkey prompt (no chat template), about ``total_tokens`` tokens long,
    with the needle at relative ``depth`` (0 = start, 1 = end) of the filler."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    return haystack(tokenizer, PASSKEY_INTRO, [(depth, needle)], PASSKEY_QUESTION, total_tokens)


def multikey_needle_case(tokenizer: Any, rng: random.Random, total_tokens: int,
                         num_needles: int = 4) -> TaskCase:
    """``num_needles`` needles with distinct keys at evenly spread depths; one is asked."""
    keys = rng.sample(NEEDLE_KEYS, num_needles)
    values = rng.sample(range(100000, 1000000), num_needles)
    needles = [((i + 0.5) / num_needles,
                f"The special magic number for {k} is {v}. ")
               for i, (k, v) in enumerate(zip(keys, values))]
    ask = rng.randrange(num_needles)
    question = (f"What is the special magic number for {keys[ask]}? The special magic number "
                f"for {keys[ask]} is")
    prompt = haystack(tokenizer, NEEDLE_INTRO, needles, question, total_tokens)
    return TaskCase(prompt, [str(values[ask])], 12)


def variable_tracking_case(tokenizer: Any, rng: random.Random, total_tokens: int,
                           num_hops: int = 2) -> TaskCase:
    """A chain of ``num_hops + 1`` variables holding one number, in order through the text."""
    names = ["".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5)) for _ in range(num_hops + 1)]
    value = rng.randrange(10000, 100000)
    statements = [f"VAR {names[0]} = {value}. "] + [
        f"VAR {names[i]} = VAR {names[i - 1]}. " for i in range(1, len(names))]
    needles = [((i + 0.5) / len(statements), s) for i, s in enumerate(statements)]
    question = (f"Question: Find all variables that are assigned the value {value} in the text "
                f"above. Answer: According to the chain of variables assigned in the text above, "
                f"{len(names)} variables are assigned the value {value}, they are:")
    prompt = haystack(tokenizer, VT_INTRO, needles, question, total_tokens)
    return TaskCase(prompt, names, 8 * len(names))
