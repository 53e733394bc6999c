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
