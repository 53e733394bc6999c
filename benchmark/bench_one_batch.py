"""Latency of one static batch without a server (SGLang's bench_one_batch flags).

    python benchmark/bench_one_batch.py --batch-size 1 8 --input-len 1024 4096 --output-len 32 \
        [--compare-hf] [--kv-compression chelsea --chelsea-keep-ratio 0.2] [--result-filename out.jsonl]

On a GPU with random weights of Llama-3-8B's shape (no download):

    python benchmark/bench_one_batch.py --model-path benchmark/configs/llama3-8b \
        --load-format dummy --skip-tokenizer-init --chunked-prefill-size 8192 \
        --batch-size 1 16 --input-len 8192 32768

Prints a table (prefill latency/throughput, median decode latency/throughput, peak RSS, KV
slots per request after prefill and at peak) and appends one JSON line per run. The
prefill runs in one step unless --chunked-prefill-size is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import time
from typing import Any, Optional

import torch

from sglang_chelsea.managers.io_struct import TokenizedGenerateReqInput
from sglang_chelsea.managers.scheduler import Scheduler
from sglang_chelsea.sampling.sampling_params import SamplingParams
from sglang_chelsea.server_args import ServerArgs


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_input_ids(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random prompts (distinct per request, so no prefix is shared)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (batch, length), generator=g).tolist()


def used_slots(scheduler: Scheduler) -> int:
    return scheduler.max_total_num_tokens - scheduler.allocator.available_size()


def run_ours(scheduler: Scheduler, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """Prefill the whole batch (one step, or several with --chunked-prefill-size), then
    decode ``output_len - 1`` steps. Tracks the KV slots in use."""
    for i, ids in enumerate(prompts):
        sp = SamplingParams(max_new_tokens=output_len, temperature=0, ignore_eos=True)
        sp.normalize()
        scheduler.add_request(TokenizedGenerateReqInput(f"bench-{i}", None, ids, sp))
    peak = 0
    compressor = scheduler.kv_compressor
    cluster0 = compressor.stats().get("clustering_seconds", 0.0) if compressor else 0.0
    t0 = time.perf_counter()
    while scheduler.waiting_queue or scheduler.chunked_req is not None:
        scheduler.step()
        peak = max(peak, used_slots(scheduler))
    prefill = time.perf_counter() - t0
    cluster = (compressor.stats().get("clustering_seconds", 0.0) - cluster0) if compressor else 0.0
    after_prefill = used_slots(scheduler)
    decode: list[float] = []
    while scheduler.has_work():
        peak = max(peak, used_slots(scheduler))
        t0 = time.perf_counter()
        scheduler.step()
        decode.append(time.perf_counter() - t0)
    scheduler.flush_cache()
    return {"prefill_latency": prefill, "decode_latencies": decode,
            "clustering_share_of_prefill": cluster / prefill,
            "kv_slots_after_prefill": after_prefill / len(prompts),
            "kv_slots_peak": peak / len(prompts)}


def run_hf(model: Any, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """HF transformers ``generate`` on the same prompts: prefill = a 1-token generate."""
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    kwargs = dict(do_sample=False, attention_mask=mask, pad_token_id=0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **kwargs)
        total = time.perf_counter() - t0
    per_token = (total - prefill) / max(1, output_len - 1)
    return {"prefill_latency": prefill, "decode_latencies": [per_token]}


def summarize(name: str, batch: int, input_len: int, output_len: int,
              run: dict[str, Any]) -> dict[str, Any]:
    median = statistics.median(run["decode_latencies"]) if run["decode_latencies"] else float("nan")
    return {
        "engine": name, "batch_size": batch, "input_len": input_len, "output_len": output_len,
        "prefill_latency_s": round(run["prefill_latency"], 4),
        "prefill_throughput_tok_s": round(batch * input_len / run["prefill_latency"], 1),
        "median_decode_latency_ms": round(median * 1000, 2),
        "median_decode_throughput_tok_s": round(batch / median, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "kv_slots_per_req": round(run.get("kv_slots_after_prefill", float("nan")), 1),
        "kv_slots_peak_per_req": round(run.get("kv_slots_peak", float("nan")), 1),
        "clustering_share_of_prefill": round(run.get("clustering_share_of_prefill", 0.0), 4),
    }


def load_hf_model(model_path: str) -> Any:
    import os

    from transformers import AutoModelForCausalLM

    if model_path.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(
            os.path.dirname(model_path), gguf_file=os.path.basename(model_path),
            dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = ["engine", "batch_size", "input_len", "output_len", "prefill_latency_s",
            "prefill_throughput_tok_s", "median_decode_latency_ms",
            "median_decode_throughput_tok_s", "peak_rss_mb", "kv_slots_per_req",
            "kv_slots_peak_per_req"]
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--input-len", type=int, nargs="+", default=[1024])
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--compare-hf", action="store_true",
                        help="Also run HF transformers generate on the same model")
    parser.add_argument("--result-filename", type=str, default="bench_one_batch.jsonl")
    args = parser.parse_args(argv)
    server_args = ServerArgs.from_cli_args(args)
    need = max(args.batch_size) * (max(args.input_len) + args.output_len) + 16
    server_args = dataclasses.replace(
        server_args, max_total_tokens=max(server_args.max_total_tokens or 0, need),
        max_prefill_tokens=max(args.batch_size) * max(args.input_len),
        chunked_prefill_size=(args.chunked_prefill_size if "--chunked-prefill-size" in
                              (argv if argv is not None else sys.argv) else -1),
        max_running_requests=max(server_args.max_running_requests,
                                                          max(args.batch_size)),
        log_level="warning", disable_radix_cache=True)
    scheduler = Scheduler(server_args)
    hf_model = load_hf_model(scheduler.model_runner.model_path) if args.compare_hf else None
    vocab = scheduler.model_config.vocab_size
    rows = []
    # Warm-up: a short batch so first-call overheads do not enter the figures; long enough
    # (three pages) that a KV policy compresses a page, which warms its code path too.
    run_ours(scheduler, synthetic_input_ids(1, 3 * server_args.chelsea_chunk_size, vocab,
                                            seed=99), 4)
    for input_len in args.input_len:
        for batch in args.batch_size:
            prompts = synthetic_input_ids(batch, input_len, vocab)
            rows.append(summarize("sglang-chelsea", batch, input_len, args.output_len,
                                  run_ours(scheduler, prompts, args.output_len)))
            if hf_model is not None:
                rows.append(summarize("hf-transformers", batch, input_len, args.output_len,
                                      run_hf(hf_model, prompts, args.output_len)))
            print(json.dumps(rows[-1]), file=sys.stderr)
    device = scheduler.model_runner.device
    for row in rows:
        row.update({"kv_compression": server_args.kv_compression,
                    "keep_ratio": server_args.chelsea_keep_ratio,
                    "model": scheduler.model_runner.model_path,
                    "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                               else f"cpu x{torch.get_num_threads()} threads"),
                    "dtype": str(scheduler.model_runner.dtype).removeprefix("torch."),
                    "attention_backend": server_args.attention_backend,
                    "threads": torch.get_num_threads()})
    print_table(rows)
    with open(args.result_filename, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
