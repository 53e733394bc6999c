"""One table and one plot comparing the KV policies (issue: recall policies).

Joins, by policy spec, the rows of ``bench_decode_kl.py`` (decode KL, top-1 agreement, peak
device KV, decode ms/step) with the passkey rows of ``bench_accuracy.py`` (accuracy per
context length), prints a markdown table and draws passkey accuracy and decode KL against
the device KV each policy holds.

Example::

    python benchmark/policy_table.py --kl results/decode_kl_policies.json \\
        --passkey results/accuracy_policies_passkey.json --plot docs/img/policies.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any, Optional


def load_rows(paths: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in paths:
        with open(path) as f:
            rows.extend(json.load(f))
    return rows


def device_kv(row: dict[str, Any]) -> float:
    """Peak device KV as a share of the full cache: bytes when the policy reports them
    (``--kv-offload``: pool + working set + index), else pool slots."""
    return row.get("peak_device_kv_fraction") or row["peak_device_fraction"]


def build_table(kl_rows: list[dict[str, Any]], passkey_rows: list[dict[str, Any]]
                ) -> tuple[list[int], list[dict[str, Any]]]:
    """Context lengths, and one merged row per policy of ``kl_rows`` (in their order)."""
    passkey: dict[str, dict[int, tuple[float, str]]] = defaultdict(dict)
    for r in passkey_rows:
        if r.get("task") == "passkey":
            cases = r.get("cases") or []
            ok = sum(bool(c.get("ok")) for c in cases)
            shown = f"{ok}/{len(cases)}" if cases else f"{r['accuracy']:.0%}"
            passkey[r["policy"]][r["context_len"]] = (r["accuracy"], shown)
    lens = sorted({n for by_len in passkey.values() for n in by_len})
    table = []
    for r in kl_rows:
        cells = [passkey[r["policy"]].get(n) for n in lens]
        table.append({"policy": r["policy"], "passkey": [c[1] if c else "-" for c in cells],
                      "passkey_accuracy": [c[0] for c in cells if c],
                      "kl": r["kl"], "top1": r["top1_agreement"], "device_kv": device_kv(r),
                      "decode_ms": r.get("decode_ms")})
    return lens, table


def print_table(lens: list[int], table: list[dict[str, Any]]) -> None:
    heads = [f"passkey {n // 1024}k" for n in lens]
    print("| policy | " + " | ".join(heads) + " | decode KL | top-1 | peak device KV | "
          "decode ms/step |")
    print("|" + " --- |" * (len(heads) + 5))
    for t in table:
        ms = "-" if t["decode_ms"] is None else f"{t['decode_ms']:.1f}"
        print(f"| {t['policy']} | " + " | ".join(t["passkey"])
              + f" | {t['kl']:.4f} | {t['top1']:.3f} | {t['device_kv']:.1%} | {ms} |")


def plot(table: list[dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_pk, ax_kl) = plt.subplots(1, 2, figsize=(11, 4.2))
    for t in table:
        scores = t["passkey_accuracy"]
        x = 100 * t["device_kv"]
        if scores:
            ax_pk.scatter(x, sum(scores) / len(scores))
            ax_pk.annotate(t["policy"], (x, sum(scores) / len(scores)), fontsize=7)
        ax_kl.scatter(x, max(t["kl"], 1e-5))
        ax_kl.annotate(t["policy"], (x, max(t["kl"], 1e-5)), fontsize=7)
    ax_pk.set(xlabel="peak device KV (% of the full cache)", ylabel="passkey accuracy",
              title="passkey (mean over context lengths)")
    ax_kl.set(xlabel="peak device KV (% of the full cache)", ylabel="decode KL vs full cache",
              yscale="log", title="KL through decode steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kl", nargs="+", required=True, help="bench_decode_kl.py outputs")
    parser.add_argument("--passkey", nargs="*", default=[], help="bench_accuracy.py outputs")
    parser.add_argument("--plot", type=str, default=None, help="PNG to write")
    args = parser.parse_args(argv)
    lens, table = build_table(load_rows(args.kl), load_rows(args.passkey))
    print_table(lens, table)
    if args.plot:
        plot(table, args.plot)


if __name__ == "__main__":
    main()
