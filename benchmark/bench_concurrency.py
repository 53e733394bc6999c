"""How many long requests a fixed KV pool holds at once: full cache vs a KV policy.

    python benchmark/bench_concurrency.py --input-len 8160 --output-len 16 --num-requests 24 \
        --policies none chelsea:keep=0.2

All requests arrive at once in one engine whose pool holds ``--pool-requests`` full-cache
requests (plus one prefill chunk). The scheduler prefills while it can and decodes when the
pool is full, so the most requests running at once is the number the pool holds. Printed
per policy: that peak, retractions, and the KV slots a running request held at that point.

The slot schedule of a policy does not depend on the weights (Chelsea's targets are reached
whenever any pair may merge, ``--chelsea-min-similarity -1``, as they always are on
SmolLM2), so by default a tiny random-weight model of ``benchmark/configs/tiny-llama`` is
served and the run takes a minute; ``--model-path`` serves any other.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_accuracy import observing_steps, parse_policy  # noqa: E402

from sglang_chelsea import Engine  # noqa: E402

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny-llama")


def run_policy(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    """Serve ``args.num_requests`` requests at once under ``spec``; return the peak."""
    policy = parse_policy(spec)
    engine_args = policy.engine_args(args.input_len)
    if policy.name == "chelsea":
        engine_args["chelsea_min_similarity"] = -1.0
    pool = args.pool_requests * (args.input_len + args.output_len) + args.chunked_prefill_size
    engine = Engine(model_path=args.model_path, load_format=args.load_format,
                    skip_tokenizer_init=args.load_format == "dummy", max_total_tokens=pool,
                    chunked_prefill_size=args.chunked_prefill_size, disable_radix_cache=True,
                    max_running_requests=args.num_requests, log_level="warning",
                    num_threads=args.num_threads, **engine_args)
    sched = engine.scheduler
    retract = sched._retract
    peak = {"running": 0, "slots_in_use": 0, "retractions": 0}

    def record() -> None:
        if len(sched.running) > peak["running"]:
            peak["running"] = len(sched.running)
            peak["slots_in_use"] = sched.max_total_num_tokens - sched.allocator.available_size()

    def counted_retract(req: Any) -> None:
        peak["retractions"] += 1
        retract(req)

    sched._retract = counted_retract
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.input_len)]
               for _ in range(args.num_requests)]
    try:
        with observing_steps(engine, record):
            outs = engine.generate(input_ids=prompts, sampling_params={
                "temperature": 0, "max_new_tokens": args.output_len, "ignore_eos": True})
        assert all(o["meta_info"]["completion_tokens"] == args.output_len for o in outs)
    finally:
        engine.shutdown()
    return {"policy": spec, "pool_slots": pool, "input_len": args.input_len,
            "output_len": args.output_len, "num_requests": args.num_requests,
            "peak_running": peak["running"], "retractions": peak["retractions"],
            "slots_per_running_req": round(peak["slots_in_use"] / max(1, peak["running"]), 1)}


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", nargs="+", default=["none", "chelsea:keep=0.2"])
    p.add_argument("--model-path", default=TINY)
    p.add_argument("--load-format", default=None,
                   help="default: dummy for the tiny config, auto otherwise")
    p.add_argument("--input-len", type=int, default=8160)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=24)
    p.add_argument("--pool-requests", type=int, default=4,
                   help="the pool holds this many full-cache requests (+ one prefill chunk)")
    p.add_argument("--chunked-prefill-size", type=int, default=2048)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="append one JSON line per policy")
    args = p.parse_args(argv)
    if args.load_format is None:
        args.load_format = "dummy" if args.model_path == TINY else "auto"
    rows = [run_policy(spec, args) for spec in args.policies]
    base = rows[0]["peak_running"]
    for row in rows:
        row["vs_first"] = round(row["peak_running"] / max(1, base), 2)
        print(json.dumps(row), flush=True)
        if args.output:
            with open(args.output, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
