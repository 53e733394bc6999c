"""The Triton attention backend inside the engine gives the torch backend's outputs: full
cache and Chelsea (centroid slots with size weights), prefill chunks and decode, batched.
On the CPU the kernels run through the Triton interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest

from sglang_chelsea import Engine
from utils.runtime import random_ids

PARAMS = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}



def _run(model_path: str, backend: str, **kw) -> list[dict]:
    engine = Engine(model_path=model_path, attention_backend=backend, max_total_tokens=3000,
                    log_level="warning", chunked_prefill_size=48, **kw)
    try:
        # Two prompts batched together, then one sharing the first's prefix (a radix hit).
        first = engine.generate(input_ids=[random_ids(150, 0), random_ids(70, 1)],
                                sampling_params=PARAMS, return_logprob=True)
        hit = engine.generate(input_ids=random_ids(150, 0)[:130] + random_ids(20, 2),
                              sampling_params=PARAMS, return_logprob=True)
        return first + [hit]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("policy", [
    {},
    {"kv_compression": "chelsea", "chelsea_chunk_size": 32, "chelsea_keep_ratio": 0.5},
])
def test_triton_backend_matches_torch_backend(tiny_llama_dir: str, policy: dict) -> None:
    ref = _run(tiny_llama_dir, "torch", **policy)
    got = _run(tiny_llama_dir, "triton", **policy)
    assert got[2]["meta_info"]["cached_tokens"] > 0
    for a, b in zip(got, ref):
        assert a["output_ids"] == b["output_ids"]
        lp_a = [lp for lp, _, _ in a["meta_info"]["output_token_logprobs"]]
        lp_b = [lp for lp, _, _ in b["meta_info"]["output_token_logprobs"]]
        assert lp_a == pytest.approx(lp_b, abs=1e-4)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch) -> None:
    from sglang_chelsea.server_args import ServerArgs

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs --device cuda"):
        ServerArgs(attention_backend="triton", device="cpu")
