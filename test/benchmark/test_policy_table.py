"""policy_table.py joins decode-KL rows and passkey rows by policy spec."""

from __future__ import annotations

import json
from pathlib import Path

from policy_table import build_table, main


def _kl_row(policy: str, kl: float, device: float, **extra: float) -> dict:
    return {"policy": policy, "kl": kl, "top1_agreement": 0.9, "peak_device_fraction": device,
            "decode_ms": 12.5, **extra}


def _passkey_row(policy: str, context_len: int, oks: list[bool]) -> dict:
    return {"policy": policy, "task": "passkey", "context_len": context_len,
            "accuracy": sum(oks) / len(oks), "cases": [{"ok": ok} for ok in oks]}


def test_rows_join_by_policy_and_offload_reports_bytes(tmp_path: Path, capsys) -> None:
    kl = [_kl_row("clusterkv:keep=0.2", 0.01, 1.0),
          _kl_row("clusterkv:keep=0.2,offload=1", 0.01, 0.07, peak_device_kv_fraction=0.47),
          _kl_row("streaming:keep=0.2", 0.15, 0.23)]
    passkey = [_passkey_row("clusterkv:keep=0.2", 2048, [True] * 5),
               _passkey_row("clusterkv:keep=0.2", 4096, [True, True, False, True, True]),
               _passkey_row("streaming:keep=0.2", 4096, [False] * 4 + [True])]
    lens, table = build_table(kl, passkey)
    assert lens == [2048, 4096]
    assert [t["passkey"] for t in table] == [["5/5", "4/5"], ["-", "-"], ["-", "1/5"]]
    # Offload: the device holds pool + working set + index bytes, not just its pool slots.
    assert [t["device_kv"] for t in table] == [1.0, 0.47, 0.23]
    kl_file, pk_file = tmp_path / "kl.json", tmp_path / "pk.json"
    kl_file.write_text(json.dumps(kl))
    pk_file.write_text(json.dumps(passkey))
    main(["--kl", str(kl_file), "--passkey", str(pk_file), "--plot", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert "| streaming:keep=0.2 | - | 1/5 | 0.1500 | 0.900 | 23.0% | 12.5 |" in out
    assert (tmp_path / "p.png").stat().st_size > 0


def test_passkey_rows_report_peak_device_slots(tiny_llama_dir: str) -> None:
    """bench_accuracy's peak device slots of one request: every token with the full cache,
    a fraction with Chelsea (the prefill chunk being compressed included)."""
    from bench_accuracy import peak_slots_during
    from sglang_chelsea import Engine
    from utils.runtime import random_ids

    ids, new = random_ids(200, 5), 6
    peaks = []
    for policy in ({}, {"kv_compression": "chelsea", "chelsea_chunk_size": 32,
                        "chelsea_keep_ratio": 0.25}):
        engine = Engine(model_path=tiny_llama_dir, max_total_tokens=1000, log_level="warning",
                        chunked_prefill_size=32, disable_radix_cache=True, **policy)
        try:
            out, peak = peak_slots_during(engine, lambda: engine.generate(
                input_ids=ids, sampling_params={"max_new_tokens": new, "ignore_eos": True}))
        finally:
            engine.shutdown()
        assert len(out["output_ids"]) == new
        peaks.append(peak)
    # Full cache, seen between scheduler steps: the prompt and the generated tokens written
    # before the last step (which writes one more and frees the request).
    assert peaks[0] == len(ids) + new - 2
    # Chelsea keep 0.25 on 32-token chunks: 4 sinks raw, one recent chunk and the partial
    # chunk raw, the rest at 8 slots per chunk.
    assert peaks[1] < 0.5 * peaks[0]
