"""bench_accuracy.py's passkey tasks: the same prompts, scored with or without a fixed answer format."""

from __future__ import annotations

import re

from bench_accuracy import PASSKEY_FORMATS, run_passkey
from sglang_chelsea import Engine


def test_passkey_digits_constrains_every_answer_to_a_five_digit_number(tiny_llama_dir: str) -> None:
    """passkey_digits asks the same prompts with the answer format fixed by SGLang's regex: a
    random-weight model then still answers a space and five digits, and is scored by them."""
    engine = Engine(model_path=tiny_llama_dir, max_total_tokens=1000, log_level="warning",
                    chunked_prefill_size=64, disable_radix_cache=True)
    try:
        fixed = run_passkey(engine, 300, 3, 0, PASSKEY_FORMATS["passkey_digits"])
        plain = run_passkey(engine, 300, 3, 0, PASSKEY_FORMATS["passkey"])
    finally:
        engine.shutdown()
    answers = [c["answer"] for c in fixed["cases"]]
    assert all(re.fullmatch(r" [0-9]{5}", a) for a in answers), answers
    assert fixed["accuracy"] == sum(c["ok"] for c in fixed["cases"]) / 3
    # Same keys and depths; the unconstrained answers of random weights are not numbers.
    assert [(c["key"], c["depth"]) for c in fixed["cases"]] == \
        [(c["key"], c["depth"]) for c in plain["cases"]]
    assert not any(re.fullmatch(r" [0-9]{5}", c["answer"]) for c in plain["cases"])
