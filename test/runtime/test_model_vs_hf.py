"""Our model runner against Hugging Face transformers on the same weights, in float32.

For the default SmolLM2-135M GGUF and the tiny random Llama / Qwen2 / Qwen3 checkpoints:
- full-prefill logits (every position, through ``ModelRunner.forward``) match HF's;
- a 32-token greedy generation through the Engine (prefill then decode steps) gives
  HF ``generate(do_sample=False)``'s tokens, and each decode step's logprobs (the chosen
  token's and the top-5) match HF's ``log_softmax`` of that step's logits.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from sglang_chelsea import Engine
from utils.runtime import (
    assert_no_leak,
    hf_greedy,
    hf_logits,
    max_rel_err,
    prefill_logits,
    random_ids,
)

RTOL = 1e-4  # relative to the largest |logit|
NEW_TOKENS = 32
TOP_K = 5

GGUF_PROMPT = (
    "The history of astronomy begins with ancient observers who tracked the motion of the "
    "sun, the moon and the planets across the sky. Over centuries, careful measurements led "
    "to new models of the solar system, and the invention of the telescope revealed"
)


@dataclass
class Pair:
    name: str
    engine: Any
    hf: Any
    prompt_ids: list[int]


@pytest.fixture(scope="module", params=["smollm2_gguf", "tiny_llama", "tiny_qwen2",
                                        "tiny_qwen3"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    name: str = request.param
    if name == "smollm2_gguf":
        path: str = request.getfixturevalue("default_model_path")
        directory, file_name = os.path.split(path)
        hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name,
                                                  dtype=torch.float32)
    else:
        path = request.getfixturevalue(f"{name}_dir")
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.eval()
    engine = Engine(model_path=path, max_total_tokens=1024, log_level="warning")
    if name == "smollm2_gguf":
        ids = engine.tokenizer.encode(GGUF_PROMPT)
    else:
        ids = random_ids(71, seed=7)
    assert 40 <= len(ids) <= 100
    yield Pair(name, engine, hf, ids)
    engine.shutdown()


def test_prefill_logits_match_hf(pair: Pair) -> None:
    ours = prefill_logits(pair.engine.scheduler.model_runner, pair.prompt_ids)
    ref = hf_logits(pair.hf, pair.prompt_ids)
    assert ours.shape == ref.shape == (len(pair.prompt_ids), pair.hf.config.vocab_size)
    err = max_rel_err(ours, ref)
    assert err <= RTOL, f"{pair.name}: max|ours - hf| / max|hf| = {err:.2e}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    assert_no_leak(pair.engine)


def test_greedy_decode_matches_hf(pair: Pair) -> None:
    ids = pair.prompt_ids
    out = pair.engine.generate(input_ids=ids,
                               sampling_params={"max_new_tokens": NEW_TOKENS, "temperature": 0},
                               return_logprob=True, logprob_start_len=len(ids) - 1,
                               top_logprobs_num=TOP_K)
    ref_ids, ref_logits = hf_greedy(pair.hf, ids, NEW_TOKENS)
    assert out["output_ids"] == ref_ids, pair.name
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == len(ids)
    assert meta["completion_tokens"] == len(ref_ids)
    if len(ref_ids) < NEW_TOKENS:  # both stopped at the end-of-sequence token
        assert meta["finish_reason"]["type"] == "stop"
    else:
        assert meta["finish_reason"] == {"type": "length", "length": NEW_TOKENS}

    ref_lp = torch.log_softmax(ref_logits, dim=-1)
    token_lps = meta["output_token_logprobs"]
    top_lps = meta["output_top_logprobs"]
    assert len(token_lps) == len(top_lps) == len(ref_ids)
    for step, ((lp, tok, _), top) in enumerate(zip(token_lps, top_lps)):
        tol = RTOL * float(ref_logits[step].abs().max())
        assert tok == ref_ids[step]
        assert abs(lp - float(ref_lp[step, tok])) <= tol, (pair.name, step)
        assert len(top) == TOP_K and top[0][1] == tok  # greedy: the chosen token is the best
        ref_top = torch.topk(ref_lp[step], TOP_K).values.tolist()
        for (value, top_id, _), ref_value in zip(top, ref_top):
            assert abs(value - float(ref_lp[step, top_id])) <= tol, (pair.name, step, top_id)
            assert abs(value - ref_value) <= tol, (pair.name, step)  # they are HF's top 5
    if pair.name == "smollm2_gguf":  # real weights continue the prompt with real words
        assert "universe" in out["text"], out["text"]
    assert_no_leak(pair.engine)

