"""The same offline workload through this engine, HF transformers and (if installed)
llama-cpp-python, on the same model, in one run; prints the throughput ratios.

    python benchmark/compare_baselines.py --num-prompts 8 --input-len 1024 --output-len 32 \
        [--kv-compression chelsea --chelsea-keep-ratio 0.2] --output results/baselines.json

Workload: ``--num-prompts`` prompts of ``--input-len`` random token ids, ``--output-len``
greedy tokens each (EOS ignored). sglang-chelsea: the offline ``Engine`` gets all prompts
at once (continuous batching, chunked prefill, the ServerArgs flags given). HF
transformers: ``generate`` on all prompts as one batch (equal lengths, no padding), fp32.
llama-cpp-python: the GGUF file itself (its own quantised kernels), one prompt after the
other (its high-level API decodes one sequence). Reported: wall time, output and total
token throughput, and each baseline's ratio to this engine; for HF also the share of
greedy tokens identical to ours (full cache: expected near 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any, Optional

import torch

from bench_one_batch import load_hf_model, synthetic_input_ids
from sglang_chelsea import Engine
from sglang_chelsea.model_loader import resolve_model_path
from sglang_chelsea.server_args import ServerArgs

LLAMA_CPP_MISSING = (
    "llama-cpp-python is not installed: skipped. PyPI has only its source distribution, "
    "which compiles llama.cpp (it did not finish within 5 minutes on the 2-core machine; "
    "see docs/benchmarks.md). Install it with `pip install llama-cpp-python` to add it.")


@dataclasses.dataclass
class RunResult:
    engine: str
    seconds: float
    output_ids: list[list[int]]
    note: str = ""

    def summary(self, input_tokens: int) -> dict[str, Any]:
        out_tokens = sum(len(o) for o in self.output_ids)
        return {"engine": self.engine, "seconds": round(self.seconds, 2),
                "output_tokens": out_tokens,
                "output_throughput_tok_s": round(out_tokens / self.seconds, 2),
                "total_throughput_tok_s": round((input_tokens + out_tokens) / self.seconds, 2),
                "note": self.note}


def run_engine(engine: Engine, prompts: list[list[int]], output_len: int) -> RunResult:
    server_args = engine.server_args
    params = {"max_new_tokens": output_len, "temperature": 0, "ignore_eos": True}
    engine.generate(input_ids=[prompts[0][:32]], sampling_params=params)  # warm-up
    engine.flush_cache()
    t0 = time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    seconds = time.perf_counter() - t0
    kv = engine.get_server_info()["kv_cache"]
    engine.shutdown()
    note = f"kv_compression={server_args.kv_compression}"
    if server_args.kv_compression == "chelsea":
        note += f" keep={server_args.chelsea_keep_ratio}"
    note += f", KV compression ratio at the end {kv['compression_ratio']:.2f}"
    return RunResult("sglang-chelsea", seconds, [o["output_ids"] for o in outs], note)


def run_hf(model_path: str, prompts: list[list[int]], output_len: int) -> RunResult:
    model = load_hf_model(model_path)
    ids = torch.tensor(prompts)
    kwargs = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0,
                  max_new_tokens=output_len, min_new_tokens=output_len)
    with torch.inference_mode():
        model.generate(ids[:1, :32], **{**kwargs, "attention_mask": torch.ones(1, 32,
                                        dtype=torch.long)})  # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
        seconds = time.perf_counter() - t0
    return RunResult("hf-transformers", seconds, out[:, ids.shape[1]:].tolist(),
                     "one batch, fp32, SDPA, DynamicCache")


def run_llama_cpp(model_path: str, prompts: list[list[int]], output_len: int,
                  threads: int) -> Optional[RunResult]:
    try:
        from llama_cpp import Llama
    except ImportError:
        print(LLAMA_CPP_MISSING)
        return None
    if not model_path.endswith(".gguf"):
        print("llama-cpp-python needs a GGUF model: skipped.")
        return None
    llm = Llama(model_path=model_path, n_ctx=len(prompts[0]) + output_len + 8,
                n_threads=threads, n_batch=512, verbose=False)
    no_eos = {llm.token_eos(): -float("inf")}
    t0 = time.perf_counter()
    outputs = []
    for ids in prompts:
        llm.reset()
        res = llm.create_completion(ids, max_tokens=output_len, temperature=0.0,
                                    logit_bias=no_eos)
        outputs.append(llm.tokenize(res["choices"][0]["text"].encode(), add_bos=False,
                                    special=True))
    return RunResult("llama-cpp-python", time.perf_counter() - t0, outputs,
                     "GGUF as stored (quantised), one prompt at a time; output tokens "
                     "re-tokenised from text")


def token_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two runs' greedy tokens are equal."""
    same = total = 0
    for x, y in zip(a, b):
        same += sum(i == j for i, j in zip(x, y))
        total += max(len(x), len(y))
    return same / max(total, 1)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--baselines", nargs="+", default=["hf", "llama-cpp"],
                        choices=["hf", "llama-cpp"])
    parser.add_argument("--output", type=str, default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)
    server_args = ServerArgs.from_cli_args(args)
    need = args.num_prompts * (args.input_len + args.output_len) + 64
    server_args = dataclasses.replace(
        server_args, log_level="warning",
        max_total_tokens=max(server_args.max_total_tokens or 0, need),
        max_running_requests=max(server_args.max_running_requests, args.num_prompts))
    if server_args.num_threads:
        torch.set_num_threads(server_args.num_threads)
    model_path = resolve_model_path(server_args.model_path)
    engine = Engine(**dataclasses.asdict(server_args))
    prompts = synthetic_input_ids(args.num_prompts, args.input_len,
                                  engine.scheduler.model_config.vocab_size)
    input_tokens = args.num_prompts * args.input_len

    ours = run_engine(engine, prompts, args.output_len)
    runs = [ours]
    if "hf" in args.baselines:
        runs.append(run_hf(model_path, prompts, args.output_len))
    if "llama-cpp" in args.baselines:
        llama = run_llama_cpp(model_path, prompts, args.output_len, torch.get_num_threads())
        if llama is not None:
            runs.append(llama)
    rows = [r.summary(input_tokens) for r in runs]
    base = rows[0]["output_throughput_tok_s"]
    for run, row in zip(runs, rows):
        row["ours_over_this"] = round(base / row["output_throughput_tok_s"], 2)
        row["token_agreement_with_ours"] = round(token_agreement(ours.output_ids,
                                                                 run.output_ids), 3)
        row.update({"num_prompts": args.num_prompts, "input_len": args.input_len,
                    "output_len": args.output_len, "threads": torch.get_num_threads()})
    print(f"\n{args.num_prompts} prompts x {args.input_len} input tokens, {args.output_len} "
          f"output tokens each; model {os.path.basename(model_path)}; "
          f"{torch.get_num_threads()} threads")
    print("engine | seconds | output tok/s | total tok/s | sglang-chelsea speed-up | "
          "same greedy tokens | note")
    print("--- | --- | --- | --- | --- | --- | ---")
    for r in rows:
        print(f"{r['engine']} | {r['seconds']} | {r['output_throughput_tok_s']} | "
              f"{r['total_throughput_tok_s']} | {r['ours_over_this']}x | "
              f"{r['token_agreement_with_ours']} | {r['note']}")
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
