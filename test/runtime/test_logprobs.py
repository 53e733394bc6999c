"""Input-token logprobs (``return_logprob`` with ``logprob_start_len``) against HF.

``input_token_logprobs[j]`` is ``[logprob, id, None]`` of prompt token ``start + j``
given the tokens before it; the first entry's logprob is null (SGLang's format). They must
equal HF's ``log_softmax`` of the previous position's logits, whether the prompt is
prefilled at once, in chunks, after a radix hit, or alongside other requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from sglang_chelsea import Engine
from utils.runtime import assert_no_leak, hf_logits, random_ids

RTOL = 1e-4
TOP = 3
PROMPT = random_ids(83, seed=21)


@dataclass
class Ref:
    hf: Any
    logits: torch.Tensor  # HF logits of PROMPT, [T, V]
    path: str
    engines: dict[int, Any]  # radix-less engines by chunked_prefill_size

    def logprobs(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits if ids == PROMPT else hf_logits(self.hf, ids)
        return torch.log_softmax(logits, dim=-1), logits.abs().amax(dim=-1)


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_qwen2"])
def ref(request: pytest.FixtureRequest) -> Iterator[Ref]:
    path: str = request.getfixturevalue(f"{request.param}_dir")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    yield Ref(hf, hf_logits(hf, PROMPT), path, {})


def engine_for(ref: Ref, **kwargs: Any) -> Any:
    return Engine(model_path=ref.path, max_total_tokens=2048, log_level="warning", **kwargs)


def check_input_logprobs(ref: Ref, out: dict, ids: list[int], start: int,
                         top: int = 0) -> None:
    lp, scale = ref.logprobs(ids)
    meta = out["meta_info"]
    got = meta["input_token_logprobs"]
    assert [t for _, t, _ in got] == ids[start:]
    assert got[0][0] is None
    for j, (value, token, _) in enumerate(got[1:], start=start + 1):
        tol = RTOL * float(scale[j - 1])
        assert abs(value - float(lp[j - 1, token])) <= tol, (j, value, float(lp[j - 1, token]))
    if top:
        tops = meta["input_top_logprobs"]
        assert len(tops) == len(got) and tops[0] is None
        for j, entry in enumerate(tops[1:], start=start + 1):
            ref_values = torch.topk(lp[j - 1], top).values.tolist()
            assert len(entry) == top
            for (value, token, _), ref_value in zip(entry, ref_values):
                tol = RTOL * float(scale[j - 1])
                assert abs(value - float(lp[j - 1, token])) <= tol
                assert abs(value - ref_value) <= tol
    # The first output token's logprob comes from the last prompt position.
    if meta["output_token_logprobs"]:
        value, token, _ = meta["output_token_logprobs"][0]
        assert token == int(lp[-1].argmax())
        assert abs(value - float(lp[-1, token])) <= RTOL * float(scale[-1])


@pytest.mark.parametrize("start", [0, 1, 37, len(PROMPT) - 1])
@pytest.mark.parametrize("chunk", [-1, 7, 16])
def test_input_logprobs_match_hf(ref: Ref, start: int, chunk: int) -> None:
    if chunk not in ref.engines:
        ref.engines[chunk] = engine_for(ref, chunked_prefill_size=chunk, disable_radix_cache=True)
    engine = ref.engines[chunk]
    out = engine.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 2, "temperature": 0},
                          return_logprob=True, logprob_start_len=start, top_logprobs_num=TOP)
    assert out["meta_info"]["cached_tokens"] == 0
    check_input_logprobs(ref, out, PROMPT, start, top=TOP)
    assert_no_leak(engine)


@pytest.mark.parametrize("page_size,chunk", [(1, -1), (4, -1), (4, 7)])
def test_input_logprobs_after_a_radix_hit(ref: Ref, page_size: int, chunk: int) -> None:
    engine = engine_for(ref, page_size=page_size, chunked_prefill_size=chunk)
    greedy = {"max_new_tokens": 3, "temperature": 0}
    first = engine.generate(input_ids=PROMPT, sampling_params=greedy)
    assert first["meta_info"]["cached_tokens"] == 0
    # The cached prefix may only cover the tokens before logprob_start_len.
    for start in (0, 22, 50, len(PROMPT) - 1):
        out = engine.generate(input_ids=PROMPT, sampling_params=greedy, return_logprob=True,
                              logprob_start_len=start)
        assert out["meta_info"]["cached_tokens"] == start // page_size * page_size, start
        assert out["output_ids"] == first["output_ids"]
        check_input_logprobs(ref, out, PROMPT, start)
    # A prompt sharing a prefix with the cached one.
    other = PROMPT[:60] + random_ids(15, seed=3)
    out = engine.generate(input_ids=other, sampling_params=greedy, return_logprob=True,
                          logprob_start_len=55)
    assert out["meta_info"]["cached_tokens"] == 55 // page_size * page_size
    check_input_logprobs(ref, out, other, 55)
    assert_no_leak(engine)


def test_batch_with_different_starts_and_prefill_only(ref: Ref) -> None:
    engine = engine_for(ref, chunked_prefill_size=16)
    prompts = [PROMPT, random_ids(30, seed=4), PROMPT[:40], random_ids(5, seed=5)]
    starts = [3, 0, 39, 2]
    outs = engine.generate(input_ids=prompts, return_logprob=[True, True, True, False],
                           logprob_start_len=starts, top_logprobs_num=[2, 0, 1, 0],
                           sampling_params=[{"max_new_tokens": m, "temperature": 0}
                                            for m in (0, 4, 1, 2)])
    for i in range(3):
        check_input_logprobs(ref, outs[i], prompts[i], starts[i], top=[2, 0, 1][i])
    assert outs[0]["output_ids"] == [] and outs[0]["meta_info"]["output_token_logprobs"] == []
    assert len(outs[1]["meta_info"]["output_token_logprobs"]) == 4
    assert "input_token_logprobs" not in outs[3]["meta_info"]
    assert_no_leak(engine)
