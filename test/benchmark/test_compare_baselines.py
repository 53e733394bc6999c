"""compare_baselines.py on a tiny model: both engines run the same prompts."""

from __future__ import annotations

import pytest
from compare_baselines import main, token_agreement


def test_token_agreement() -> None:
    assert token_agreement([[1, 2, 3], [4, 5]], [[1, 2, 9], [4, 5]]) == pytest.approx(4 / 5)
    assert token_agreement([[1, 2]], [[1]]) == pytest.approx(1 / 2)


def test_engine_and_hf_on_the_same_prompts(tiny_llama_dir: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    rows = main(["--model-path", tiny_llama_dir, "--num-prompts", "2", "--input-len", "48",
                 "--output-len", "5", "--num-threads", "1", "--baselines", "hf", "llama-cpp"])
    assert [r["engine"] for r in rows][:2] == ["sglang-chelsea", "hf-transformers"]
    for r in rows:
        assert r["output_tokens"] == 10 and r["output_throughput_tok_s"] > 0
    assert rows[1]["token_agreement_with_ours"] == 1.0  # same model, greedy, full cache
    assert rows[1]["ours_over_this"] == pytest.approx(
        rows[0]["output_throughput_tok_s"] / rows[1]["output_throughput_tok_s"], rel=0.02)
    out = capsys.readouterr().out
    assert "llama-cpp-python needs a GGUF model" in out or "not installed" in out
    assert "sglang-chelsea speed-up" in out
