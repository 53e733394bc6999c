"""Time ClusterKV's kernels: cosine k-means and budgeted cluster selection, torch vs Triton.

    python benchmark/bench_clusterkv_kernels.py --device cuda --kernel kmeans \\
        --batches 768 --window 512 --head-dim 128 --tokens-per-cluster 32
    python benchmark/bench_clusterkv_kernels.py --device cuda --kernel select \\
        --q-heads 32 --kv-heads 8 --context 8192 --budget 2048 --head-dim 128

``kmeans``: ``--batches`` counts (layer, window, KV head) rows clustered in one call (one
512-token window of a 32-layer model with 8 KV heads and 2 full layers: 30 x 8 = 240);
keys are planted (noisy copies of ``window / tokens-per-cluster`` directions with varied
norms). ``select``: one decode step of one layer of one request over ``--context``
clustered tokens (called once per layer per request per step). Prints the median ms per
call of each implementation (after one warm-up call, which includes Triton's compilation)
and whether their outputs agree. On the CPU the Triton kernels need ``TRITON_INTERPRET=1``
(slow: use small sizes).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from bench_chunked_soft_matching import time_call
from sglang_chelsea.kernels.cluster_select import select_cluster_tokens
from sglang_chelsea.kernels.kmeans import cosine_kmeans


def planted_keys(b: int, n: int, d: int, centres: int, dtype: torch.dtype,
                 device: str) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(b, centres, d, generator=gen), dim=-1)
    pick = torch.randint(0, centres, (b, n), generator=gen)
    keys = dirs.gather(1, pick[..., None].expand(-1, -1, d)) * (1 + 4 * torch.rand(b, n, 1))
    return (keys + 0.3 * torch.randn(b, n, d, generator=gen)).to(device, dtype)


def bench_kmeans(args: argparse.Namespace, dtype: torch.dtype) -> None:
    n = args.window
    k = max(1, min(n, round(n / args.tokens_per_cluster)))
    keys = planted_keys(args.batches, n, args.head_dim, k, dtype, args.device)
    impls: dict[str, Callable] = {"torch": cosine_kmeans}
    if "triton" in args.impl:
        from sglang_chelsea.kernels.kmeans_triton import cosine_kmeans_triton
        impls["triton"] = cosine_kmeans_triton
    results = {}
    for name in args.impl:
        fn = impls[name]
        sec = time_call(lambda fn=fn: fn(keys, k, args.iters), args.device, args.repeats)
        results[name] = fn(keys, k, args.iters)
        print(json.dumps({"kernel": "kmeans", "impl": name, "device": args.device,
                          "dtype": args.dtype, "batches": args.batches, "window": n,
                          "clusters": k, "head_dim": args.head_dim, "iters": args.iters,
                          "ms_per_call": round(sec * 1e3, 3),
                          "us_per_batch": round(sec * 1e6 / args.batches, 3)}), flush=True)
    if len(results) == 2:
        a, b = results.values()
        print(json.dumps({
            "labels_equal": bool(torch.equal(a.labels, b.labels)),
            "labels_differing_share": float((a.labels != b.labels).float().mean()),
            "sizes_equal": bool(torch.equal(a.sizes, b.sizes)),
            "centroids_max_abs_diff": float((a.centroids - b.centroids).abs().max())}))


def bench_select(args: argparse.Namespace, dtype: torch.dtype) -> None:
    n, d, hkv = args.context, args.head_dim, args.kv_heads
    k = max(1, n // args.tokens_per_cluster)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(args.q_heads, d, generator=gen).to(args.device, dtype)
    centroids = torch.randn(hkv, k, d, generator=gen).to(args.device)
    labels = torch.randint(0, k, (hkv, n), generator=gen).to(args.device)
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "torch": lambda: select_cluster_tokens(q, centroids, labels, args.budget)}
    if "triton" in args.impl:
        from sglang_chelsea.kernels.cluster_select_triton import (
            cluster_members,
            select_cluster_tokens_triton,
        )
        members = cluster_members(labels, k)  # the engine computes these once per index
        calls["triton"] = lambda: select_cluster_tokens_triton(q, centroids, labels,
                                                               args.budget, members)
    results = {}
    for name in args.impl:
        sec = time_call(calls[name], args.device, args.repeats)
        results[name] = calls[name]()
        print(json.dumps({"kernel": "select", "impl": name, "device": args.device,
                          "dtype": args.dtype, "q_heads": args.q_heads, "kv_heads": hkv,
                          "context": n, "clusters": k, "budget": args.budget, "head_dim": d,
                          "ms_per_call": round(sec * 1e3, 3)}), flush=True)
    if len(results) == 2:
        a, b = results.values()
        print(json.dumps({"positions_equal": bool(torch.equal(a, b))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", choices=["kmeans", "select"], nargs="+",
                        default=["kmeans", "select"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", help="keys (kmeans) and q (select)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tokens-per-cluster", type=int, default=32)
    parser.add_argument("--batches", type=int, default=240)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--impl", nargs="+", default=["torch", "triton"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if "kmeans" in args.kernel:
        bench_kmeans(args, dtype)
    if "select" in args.kernel:
        bench_select(args, dtype)


if __name__ == "__main__":
    main()
