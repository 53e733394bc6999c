"""--random-seed makes sampling without a per-request seed reproducible across servers (the
scheduler's sampler was seeded from the OS before: a temperature-0.1 program could pick the
other side of a near tie from one start to the next)."""

from __future__ import annotations

from sglang_chelsea import Engine
from utils.runtime import random_ids

PARAMS = {"temperature": 1.0, "max_new_tokens": 16, "ignore_eos": True}


def _sample(model_path: str, seed: int) -> list[list[int]]:
    engine = Engine(model_path=model_path, random_seed=seed, max_total_tokens=1024,
                    log_level="warning")
    try:
        outs = engine.generate(input_ids=[random_ids(20, 0), random_ids(20, 1)],
                               sampling_params=PARAMS)
        return [o["output_ids"] for o in outs]
    finally:
        engine.shutdown()


def test_random_seed_reproduces_sampling(tiny_llama_dir: str) -> None:
    first = _sample(tiny_llama_dir, 5)
    assert _sample(tiny_llama_dir, 5) == first
    assert _sample(tiny_llama_dir, 6) != first  # the seed is what fixes them
