"""Time Chelsea's Chunked Soft Matching: the torch reference and the Triton kernel.

    python benchmark/bench_chunked_soft_matching.py --device cuda --chunks 2048 \
        --heads 8 --chunk-size 128 --head-dim 128 --keep-ratio 0.2

``--chunks`` counts (layer, chunk) pairs: one prefill step of 8192 tokens of a 32-layer
model clusters 64 chunks x 32 layers = 2048. Keys are random with planted near-duplicates
(each token is a noisy copy of one of C/4 centres), values random. Prints ms per call
and per chunk for each implementation (after one warm-up call, which includes Triton's
compilation) and whether their outputs agree.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch

from sglang_chelsea.kernels.chunked_soft_matching import MergeResult, chunked_soft_matching


def planted_keys(n: int, h: int, c: int, d: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(0)
    centres = torch.randn(n, h, max(1, c // 4), d, generator=gen)
    pick = torch.randint(0, centres.shape[2], (n, h, c), generator=gen)
    keys = centres.gather(2, pick[..., None].expand(-1, -1, -1, d))
    return (keys + 0.3 * torch.randn(n, h, c, d, generator=gen)).to(device, dtype)


def time_call(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--chunks", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--keep-ratio", type=float, default=0.2)
    parser.add_argument("--round-fraction", type=float, default=0.125)
    parser.add_argument("--impl", nargs="+", default=["torch", "triton"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    n, h, c, d = args.chunks, args.heads, args.chunk_size, args.head_dim
    keys = planted_keys(n, h, c, d, dtype, args.device)
    values = torch.randn(n, h, c, d, dtype=dtype, device=args.device)
    kwargs = dict(target=max(1, round(args.keep_ratio * c)), round_fraction=args.round_fraction,
                  min_similarity=0.0)
    impls: dict[str, Callable[..., MergeResult]] = {"torch": chunked_soft_matching}
    if "triton" in args.impl:
        from sglang_chelsea.kernels.chunked_soft_matching_triton import (
            chunked_soft_matching_triton)
        impls["triton"] = chunked_soft_matching_triton
    results = {}
    for name in args.impl:
        fn = impls[name]
        sec = time_call(lambda: fn(keys, values, **kwargs), args.device, args.repeats)
        results[name] = fn(keys, values, **kwargs)
        print(json.dumps({"impl": name, "device": args.device, "dtype": args.dtype,
                          "chunks": n, "heads": h, "chunk_size": c, "head_dim": d,
                          "keep_ratio": args.keep_ratio, "round_fraction": args.round_fraction,
                          "ms_per_call": round(sec * 1e3, 2),
                          "us_per_chunk": round(sec * 1e6 / n, 2)}), flush=True)
    if len(results) == 2:
        a, b = results.values()
        print(json.dumps({"assignments_equal": bool(torch.equal(a.assignment, b.assignment)),
                          "num_kept_equal": bool(torch.equal(a.num_kept, b.num_kept))}))


if __name__ == "__main__":
    main()
