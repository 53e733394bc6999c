"""KL vs the full cache measured through decode steps (for policies that act at decode).

    python benchmark/bench_decode_kl.py --policies chelsea:keep=0.2 \
        chelsea:keep=0.2,recall=256 clusterkv:keep=0.2 streaming:keep=0.2 snapkv:keep=0.2 \
        --prefix-len 3584 --decode-tokens 256 --output results/decode_kl.json

The first ``--prefix-len`` tokens of a real English text are prefilled (chunk by chunk, so
each policy compresses as it goes); the next ``--decode-tokens`` tokens are then fed one per
decode step (teacher forcing: the sampler is replaced by the text's next token), so
ClusterKV's selection, Chelsea's recall and SnapKV's eviction (when prefill ends) take part,
which a prefill-only measurement (bench_accuracy.py's ``kl`` task) cannot show. Each step's
next-token distribution is compared with the full cache's at the same position: mean KL,
top-1 agreement, perplexity. Policy specs are bench_accuracy.py's. With
``clusterkv:...,offload=1`` the row also has the device KV at the peak of the decode (pool +
working set + cluster index) as a share of the full cache's bytes, and the bytes copied
host -> device per decode step.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Optional

import torch

import sglang_chelsea.managers.scheduler as scheduler_module
from bench_accuracy import kl_metrics, make_engine, parse_policy, read_text, teacher_forced_logprobs
from sglang_chelsea import Engine
from sglang_chelsea.mem_cache.memory_pool import kv_bytes_per_slot


def forced_decode_logprobs(engine: Engine, ids: list[int], prefix_len: int
                           ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Log-probabilities at positions ``prefix_len - 1 .. len(ids) - 2`` with the tokens
    after the prefix forced one decode step at a time; and the peak device slots and the
    host-tier slots in use during the decode."""
    forced = ids[prefix_len:]
    rows: list[torch.Tensor] = []
    mem = {"peak_device_slots": 0, "peak_host_slots": 0, "peak_device_kv_bytes": 0,
           "working_set_bytes": 0, "steps": 0}
    original = scheduler_module.sample_batch
    stamps: list[float] = []  # one per sampled token: the gaps are decode steps

    def sample(scheduler: Any, reqs: list, logits: torch.Tensor) -> None:
        stamps.append(time.perf_counter())
        (req,) = reqs
        used = scheduler.max_total_num_tokens - scheduler.allocator.available_size()
        mem["peak_device_slots"] = max(mem["peak_device_slots"], used)
        if scheduler.kv_compressor is not None:
            stats = scheduler.kv_compressor.stats()
            mem["peak_host_slots"] = max(mem["peak_host_slots"], stats.get("host_slots", 0))
            # --kv-offload: pool + decode working set + cluster index, in bytes.
            mem["peak_device_kv_bytes"] = max(mem["peak_device_kv_bytes"],
                                              stats.get("device_kv_bytes", 0))
            if stats.get("device_working_set_bytes"):  # a decode step read the host tier
                mem["working_set_bytes"] += stats["device_working_set_bytes"]
                mem["steps"] += 1
        rows.append(torch.log_softmax(logits[0].float().cpu(), dim=-1))
        req.output_ids.append(forced[len(req.output_ids)])
        req.check_finished(scheduler.context_len, scheduler.tokenizer)

    scheduler_module.sample_batch = sample
    try:
        engine.generate(input_ids=ids[:prefix_len],
                        sampling_params={"max_new_tokens": len(forced), "ignore_eos": True})
    finally:
        scheduler_module.sample_batch = original
    steps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    mem["decode_ms"] = 1000 * steps[len(steps) // 2] if steps else None
    return torch.stack(rows), mem


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", type=str, default=None)
    parser.add_argument("--policies", nargs="+", default=["chelsea:keep=0.2"])
    parser.add_argument("--prefix-len", type=int, default=3584)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--text-file", type=str, default=None)
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--output", type=str, default="decode_kl.json")
    args = parser.parse_args(argv)
    import bench_accuracy
    bench_accuracy.NUM_THREADS = args.num_threads
    total = args.prefix_len + args.decode_tokens
    full = make_engine(parse_policy("none"), total, args.model_path)
    ids = full.tokenizer.encode(read_text(args.text_file))[:total]
    ref_all, _ = teacher_forced_logprobs(full, ids)
    full.shutdown()
    ref = ref_all[args.prefix_len - 1:total - 1]
    results = []
    for spec in args.policies:
        policy = parse_policy(spec)
        engine = make_engine(policy, total, args.model_path)
        t0 = time.perf_counter()
        got, mem = forced_decode_logprobs(engine, ids, args.prefix_len)
        kv = engine.get_server_info()["kv_cache"]
        row = {"policy": spec, "prefix_len": args.prefix_len, "decode_tokens": args.decode_tokens,
               **kl_metrics(ref, got, ids[args.prefix_len - 1:], skip=0),
               # Device slots at the peak as a share of the tokens held at the end.
               "peak_device_fraction": round(mem["peak_device_slots"] / total, 4),
               "peak_host_slots": mem["peak_host_slots"],
               # ClusterKV: share of the clustered tokens each query head attended to.
               "selected_share": kv.get("selected_share"),
               # ClusterKV on the CPU: clustered rows each KV head read (its query heads'
               # union) per clustered token.
               "kv_head_read_share": kv.get("kv_head_read_share"),
               # Median time of one decode step (forward, selection, compression, sampling).
               "decode_ms": mem["decode_ms"] and round(mem["decode_ms"], 1),
               "seconds": round(time.perf_counter() - t0, 1)}
        if kv.get("kv_offload"):
            sched = engine.scheduler
            cfg = sched.model_config
            full_bytes = total * kv_bytes_per_slot(cfg.num_hidden_layers, cfg.num_key_value_heads,
                                                   cfg.head_dim, sched.token_to_kv_pool.dtype)
            steps = max(1, kv["offload_decode_steps"])
            row.update({
                # Device KV at the peak (pool + working set + index) as a share of the full
                # cache's bytes for the same tokens.
                "peak_device_kv_fraction": round(mem["peak_device_kv_bytes"] / full_bytes, 4),
                "decode_copied_bytes_per_step": round(kv["decode_host_to_device_bytes"] / steps),
                # What the step attended from the host tier (what a step would copy with no
                # rows kept resident between steps).
                "mean_working_set_bytes": round(mem["working_set_bytes"] / max(1, mem["steps"])),
                "prefill_copied_bytes": (kv["host_to_device_bytes"]
                                         - kv["decode_host_to_device_bytes"]),
                "full_cache_bytes": full_bytes})
        results.append(row)
        print(json.dumps(row), flush=True)
        engine.shutdown()
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    print("\npolicy | decode KL | top-1 | ppl | peak device KV fraction | peak host slots | "
          "decode ms/step")
    print("--- | --- | --- | --- | --- | --- | ---")
    for r in results:
        print(f"{r['policy']} | {r['kl']:.4f} | {r['top1_agreement']:.3f} | {r['ppl']:.2f} | "
              f"{r['peak_device_fraction']:.3f} | {r['peak_host_slots']} | {r['decode_ms']}")


if __name__ == "__main__":
    main()
