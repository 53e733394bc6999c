"""passkey_first_token.py reads the first answer token's log-probabilities off the served path."""

from __future__ import annotations

import json
import math
from pathlib import Path

from passkey_first_token import main


def test_margin_is_the_space_against_the_word_the(tiny_llama_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    # The whole vocabulary as candidates, so both tokens are present for random weights.
    main(["--model-path", tiny_llama_dir, "--policies", "none", "chelsea:keep=0.5,chunk=64",
          "--context-len", "300", "--num-keys", "2", "--top", "49152", "--output", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["policy"], r["depth"]) for r in rows] == [
        ("none", 0.25), ("none", 0.75), ("chelsea:keep=0.5,chunk=64", 0.25),
        ("chelsea:keep=0.5,chunk=64", 0.75)]
    for r in rows:
        assert r["logprob_space"] < 0 and r["logprob_the"] < 0
        assert math.isclose(r["margin"], r["logprob_space"] - r["logprob_the"], abs_tol=2e-3)
    assert rows[0]["key"] == rows[2]["key"] != rows[1]["key"]  # bench_accuracy's keys, per seed


def test_a_candidate_outside_the_top_reads_null(tiny_llama_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    main(["--model-path", tiny_llama_dir, "--context-len", "300", "--num-keys", "1",
          "--top", "1", "--output", str(out)])
    (row,) = json.loads(out.read_text())
    assert row["greedy"] not in (" ", " the")  # random weights; the top-1 is only the greedy
    assert row["logprob_space"] is None and row["logprob_the"] is None and row["margin"] is None
