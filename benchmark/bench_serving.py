"""Online serving benchmark against any SGLang-compatible server (ours or SGLang itself).

    python benchmark/bench_serving.py --backend sglang --base-url http://127.0.0.1:30000 \
        --dataset-name generated-shared-prefix --gsp-num-groups 4 --gsp-prompts-per-group 16 \
        --gsp-system-prompt-len 4096 --gsp-question-len 128 --gsp-output-len 64 \
        --flush-cache --output-file results/serving.jsonl

Flags, request bodies and metric definitions are SGLang's ``sglang.bench_serving`` ones
(see benchmark/serving/), so numbers from either client compare. Prints request, input and
output token throughput and TTFT / TPOT / ITL / end-to-end latency (mean, median, p99),
the server's KV cache statistics when it reports them (``/get_server_info`` ->
``kv_cache``), and for grouped workloads the TTFT of prefix hits vs misses. Appends one
JSON line per run to ``--output-file``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from datetime import datetime
from typing import Any, Optional

import aiohttp
import requests

from serving.datasets import (DatasetRow, sample_generated_shared_prefix_requests,
                              sample_random_requests)
from serving.metrics import BenchmarkMetrics, calculate_metrics, prefix_ttft_report
from serving.request_funcs import BACKENDS, CLIENT_TIMEOUT, RequestInput, RequestOutput


def auth_headers(api_key: Optional[str]) -> dict[str, str]:
    key = api_key or os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def wait_for_server(base_url: str, headers: dict[str, str], timeout_s: float) -> str:
    """Poll ``/v1/models`` until it answers; returns the first model id."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = requests.get(f"{base_url}/v1/models", headers=headers, timeout=10)
            if r.status_code == 200:
                return r.json()["data"][0]["id"]
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"server at {base_url} not ready after {timeout_s:.0f} s")
        time.sleep(1)


def get_json(url: str, headers: dict[str, str]) -> Optional[dict[str, Any]]:
    try:
        r = requests.get(url, headers=headers, timeout=30)
        return r.json() if r.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None


def load_client_tokenizer(path: Optional[str], base_url: str, headers: dict[str, str]) -> Any:
    """``--tokenizer``, else the server's ``/get_model_info`` tokenizer (or model) path."""
    if path is None:
        info = get_json(f"{base_url}/get_model_info", headers) or {}
        path = info.get("tokenizer_path") or info.get("model_path")
    if path is None:
        raise SystemExit("cannot tell the server's tokenizer: pass --tokenizer")
    try:  # reads GGUF tokenizers too
        from sglang_chelsea.model_loader import load_tokenizer
    except ImportError:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(path)
    return load_tokenizer(path)


def build_dataset(args: argparse.Namespace, tokenizer: Any) -> list[DatasetRow]:
    if args.dataset_name in ("random", "random-ids"):
        return sample_random_requests(tokenizer, args.num_prompts, args.random_input_len,
                                      args.random_output_len, args.random_range_ratio,
                                      args.seed, args.tokenize_prompt)
    return sample_generated_shared_prefix_requests(
        tokenizer, args.gsp_num_groups, args.gsp_prompts_per_group, args.gsp_system_prompt_len,
        args.gsp_question_len, args.gsp_output_len, args.seed, args.gsp_range_ratio,
        args.tokenize_prompt, args.gsp_ordered)


async def arrivals(rows: list[DatasetRow], rate: float, seed: int):  # type: ignore[no-untyped-def]
    """Yield rows with exponential gaps of mean 1/rate (Poisson); all at once if rate = inf."""
    rng = random.Random(seed)
    for i, row in enumerate(rows):
        if i and rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
        yield row


async def run_requests(args: argparse.Namespace, api_url: str, model: str,
                       headers: dict[str, str], rows: list[DatasetRow]
                       ) -> tuple[list[RequestOutput], float]:
    request_func = BACKENDS[args.backend][1]
    extra = json.loads(args.extra_request_body) if args.extra_request_body else {}

    def make_input(row: DatasetRow, output_len: int) -> RequestInput:
        return RequestInput(row.prompt, api_url, row.prompt_len, output_len, model,
                            stream=not args.disable_stream,
                            ignore_eos=not args.disable_ignore_eos,
                            temperature=args.temperature, extra_body=extra, headers=headers)

    semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT, connector=connector) as session:
        async def one(inp: RequestInput) -> RequestOutput:
            if semaphore is None:
                return await request_func(session, inp)
            async with semaphore:
                return await request_func(session, inp)

        if args.warmup_requests:
            warm = make_input(rows[0], min(rows[0].output_len, 32))
            outs = await asyncio.gather(*(one(warm) for _ in range(args.warmup_requests)))
            if not any(o.success for o in outs):
                raise SystemExit(f"warmup failed: {outs[0].error}")
            print(f"Warmup completed with {args.warmup_requests} request(s).")
        if args.flush_cache:
            r = requests.post(f"{args.base_url}/flush_cache", headers=headers, timeout=60)
            print(f"Flushed the server's prefix cache ({r.status_code}).")
        tasks = []
        done = 0

        async def tracked(inp: RequestInput) -> RequestOutput:
            nonlocal done
            out = await one(inp)
            done += 1
            if not args.disable_tqdm:
                print(f"\r{done}/{len(rows)} requests done", end="", file=sys.stderr, flush=True)
            return out

        start = time.perf_counter()
        async for row in arrivals(rows, args.request_rate, args.seed):
            tasks.append(asyncio.create_task(tracked(make_input(row, row.output_len))))
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if not args.disable_tqdm:
            print(file=sys.stderr)
    return list(outputs), duration


def print_report(args: argparse.Namespace, m: BenchmarkMetrics, duration: float,
                 kv: Optional[dict[str, Any]], prefix: Optional[dict[str, Any]]) -> None:
    line = "{:<40} {:<10}".format
    num = "{:<40} {:<10.2f}".format
    print("\n{:=^50}".format(" Serving Benchmark Result "))
    print(line("Backend:", args.backend))
    print(line("Traffic request rate:", args.request_rate))
    print(line("Max request concurrency:", args.max_concurrency or "not set"))
    print(line("Successful requests:", m.completed))
    if m.failed:
        print(line("Failed requests:", m.failed))
    print(num("Benchmark duration (s):", duration))
    print(line("Total input tokens:", m.total_input))
    print(line("Total generated tokens:", m.total_output))
    print(line("Total generated tokens (retokenized):", m.total_output_retokenized))
    print(num("Request throughput (req/s):", m.request_throughput))
    print(num("Input token throughput (tok/s):", m.input_throughput))
    print(num("Output token throughput (tok/s):", m.output_throughput))
    print(num("Total token throughput (tok/s):", m.total_throughput))
    print(num("Concurrency:", m.concurrency))
    lat = m.latency
    for title, key in (("End-to-End Latency", "e2e_latency"), ("Time to First Token", "ttft"),
                       ("Time per Output Token (excl. 1st token)", "tpot"),
                       ("Inter-Token Latency", "itl")):
        print("{:-^50}".format(title))
        short = {"e2e_latency": "E2E Latency", "ttft": "TTFT", "tpot": "TPOT", "itl": "ITL"}[key]
        for stat in ("mean", "median", "p99"):
            print(num(f"{stat.capitalize() if stat != 'p99' else 'P99'} {short} (ms):",
                      lat[f"{stat}_{key}_ms"]))
    if prefix is not None:
        print("{:-^50}".format("Prefix hits vs misses (TTFT)"))
        print(line("Rule:", prefix["rule"]))
        print(line("Hits / misses:", f"{prefix['num_hits']} / {prefix['num_misses']}"))
        print(num("Median TTFT hit (ms):", prefix["hit_median_ttft_ms"]))
        print(num("Median TTFT miss (ms):", prefix["miss_median_ttft_ms"]))
        if "median_ttft_hit_over_miss" in prefix:
            print(num("Median TTFT hit / miss:", prefix["median_ttft_hit_over_miss"]))
    if kv:
        print("{:-^50}".format("Server KV cache"))
        for key in ("total_slots", "physical_slots", "logical_tokens", "compression_ratio",
                    "cache_hit_rate"):
            if key in kv:
                value = kv[key]
                print(num(f"{key}:", value) if isinstance(value, float) else line(f"{key}:", value))
    print("=" * 50)


def default_output_file(args: argparse.Namespace) -> str:
    day = datetime.now().strftime("%m%d")
    if args.dataset_name.startswith("random"):
        return (f"{args.backend}_{day}_{args.num_prompts}_{args.random_input_len}_"
                f"{args.random_output_len}.jsonl")
    return f"{args.backend}_{day}_{args.num_prompts}_{args.dataset_name}.jsonl"


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.base_url is None:
        args.base_url = f"http://{args.host}:{args.port}"
    args.base_url = args.base_url.rstrip("/")
    if args.dataset_name == "generated-shared-prefix":
        args.num_prompts = args.gsp_num_groups * args.gsp_prompts_per_group
    headers = auth_headers(args.api_key)
    model = args.model or wait_for_server(args.base_url, headers, args.ready_check_timeout_sec)
    tokenizer = load_client_tokenizer(args.tokenizer, args.base_url, headers)
    rows = build_dataset(args, tokenizer)
    print(f"#Input tokens: {sum(r.prompt_len for r in rows)}  "
          f"#Output tokens: {sum(r.output_len for r in rows)}  #Requests: {len(rows)}")
    api_url = args.base_url + BACKENDS[args.backend][0]
    outputs, duration = asyncio.run(run_requests(args, api_url, model, headers, rows))
    metrics = calculate_metrics(
        outputs, duration,
        retokenize=lambda text: len(tokenizer.encode(text, add_special_tokens=False)))
    info = get_json(f"{args.base_url}/get_server_info", headers) or {}
    kv = info.get("kv_cache")
    prefix = prefix_ttft_report(outputs, [r.group for r in rows])
    print_report(args, metrics, duration, kv, prefix)
    failed = [o.error for o in outputs if not o.success]
    if failed:
        print(f"first error: {failed[0][-2000:]}", file=sys.stderr)
    result: dict[str, Any] = {
        "backend": args.backend, "dataset_name": args.dataset_name, "model": model,
        "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
        "num_prompts": args.num_prompts,
        "random_input_len": args.random_input_len, "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "gsp_num_groups": args.gsp_num_groups,
        "gsp_prompts_per_group": args.gsp_prompts_per_group,
        "gsp_system_prompt_len": args.gsp_system_prompt_len,
        "gsp_question_len": args.gsp_question_len, "gsp_output_len": args.gsp_output_len,
        "duration": duration, **metrics.to_dict(),
        "prefix_ttft": prefix, "server_kv_cache": kv,
        "server_kv_compression": info.get("kv_compression"),
        "server_chelsea_keep_ratio": info.get("chelsea_keep_ratio"),
        "tag": args.tag, "date": datetime.now().isoformat(timespec="seconds"),
    }
    if args.output_details:
        result.update({
            "input_lens": [o.prompt_len for o in outputs],
            "output_lens": [o.output_len for o in outputs],
            "ttfts": [o.ttft for o in outputs], "itls": [o.itl for o in outputs],
            "cached_tokens": [o.cached_tokens for o in outputs],
            "groups": [r.group for r in rows],
            "generated_texts": [o.generated_text for o in outputs],
            "errors": [o.error for o in outputs]})
    path = args.output_file or default_output_file(args)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="sglang", choices=sorted(BACKENDS))
    p.add_argument("--base-url", type=str, default=None)
    p.add_argument("--host", type=str, default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model", type=str, default=None, help="default: the first of /v1/models")
    p.add_argument("--tokenizer", type=str, default=None,
                   help="default: the server's /get_model_info tokenizer_path or model_path")
    p.add_argument("--api-key", type=str, default=None)
    p.add_argument("--dataset-name", default="random",
                   choices=["random", "random-ids", "generated-shared-prefix"])
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=1024)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len x ratio, len] (SGLang's default 0.0)")
    p.add_argument("--gsp-num-groups", type=int, default=64)
    p.add_argument("--gsp-prompts-per-group", type=int, default=16)
    p.add_argument("--gsp-system-prompt-len", type=int, default=2048)
    p.add_argument("--gsp-question-len", type=int, default=128)
    p.add_argument("--gsp-output-len", type=int, default=256)
    p.add_argument("--gsp-range-ratio", type=float, default=1.0)
    p.add_argument("--gsp-ordered", action="store_true", help="do not shuffle across groups")
    p.add_argument("--tokenize-prompt", action="store_true",
                   help="send input_ids instead of text (sglang backend)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals; inf sends all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--disable-stream", action="store_true")
    p.add_argument("--disable-ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--extra-request-body", type=str, default=None,
                   help="JSON merged into every request body")
    p.add_argument("--warmup-requests", type=int, default=1)
    p.add_argument("--flush-cache", action="store_true",
                   help="POST /flush_cache after the warm-up (so it warms no prefix)")
    p.add_argument("--ready-check-timeout-sec", type=float, default=600)
    p.add_argument("--output-file", type=str, default=None)
    p.add_argument("--output-details", action="store_true",
                   help="also write per-request lengths, TTFTs, ITLs, texts and errors")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--tag", type=str, default=None, help="free text stored with the result")
    p.add_argument("--seed", type=int, default=1)
    return p


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
