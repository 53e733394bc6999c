"""How well Chelsea's centroids stand in for their members, per choice of query prior.

Prefills ``--context-len`` tokens of a text, clusters every chunk of the history (all but
the last two chunks) at ``--keep-ratio`` with Chunked Soft Matching, and measures, for the
queries of the last chunk (the chunk before them stays raw, as with one recent raw chunk),
the attention output over [compressed history + exact recent tokens] against the full
cache: the relative squared error ``|o - o_full|^2 / |o_full|^2``, averaged over layers,
query heads and positions. Centroids are the size-weighted mean (``none``) or query-weighted
(kernels/query_weighted_merge.py) with the mean query of: the chunk's own tokens (``own``),
the whole text (``whole``), another text (``other``), or the start-up calibration on seeded
random ids (``random``, what ``--chelsea-query-weighting`` uses).

    python benchmark/centroid_attention_error.py --keep-ratio 0.25 --num-threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_accuracy import read_text  # noqa: E402
from sglang_chelsea.compression.base import QueryObserver  # noqa: E402
from sglang_chelsea.kernels.chunked_soft_matching import chunked_soft_matching  # noqa: E402
from sglang_chelsea.kernels.query_weighted_merge import query_weighted_centroids  # noqa: E402
from sglang_chelsea.model_executor.model_runner import ModelRunner  # noqa: E402
from sglang_chelsea.model_executor.query_prior import (  # noqa: E402
    QueryMeanObserver, measure_query_prior, observed_prefill)
from sglang_chelsea.server_args import ServerArgs  # noqa: E402

PRIORS = ("none", "own", "whole", "other", "random")


class QueryRecorder(QueryObserver):
    """Keeps every layer's queries ``[T, q_heads, D]``."""

    def __init__(self) -> None:
        self.queries: dict[int, torch.Tensor] = {}

    def observe(self, layer_id: int, q: torch.Tensor, scaling: float) -> None:
        self.queries[layer_id] = q.float().clone()


def history_attention(q: torch.Tensor, hist_k: torch.Tensor, hist_v: torch.Tensor,
                      hist_logw: torch.Tensor, near_k: torch.Tensor, near_v: torch.Tensor,
                      q_pos: torch.Tensor, near_start: int) -> torch.Tensor:
    """Attention of ``q [G, T, D]`` (one KV group) over a weighted history ``[M, D]`` and the
    exact, causally masked recent tokens ``[E, D]`` starting at position ``near_start``."""
    scale = q.shape[-1] ** -0.5
    s_hist = q @ hist_k.T * scale + hist_logw
    s_near = q @ near_k.T * scale
    near_pos = torch.arange(near_start, near_start + near_k.shape[0])
    s_near = s_near.masked_fill(near_pos[None, :] > q_pos[:, None], float("-inf"))
    p = torch.cat([s_hist, s_near], dim=-1).softmax(-1)
    m = hist_k.shape[0]
    return p[..., :m] @ hist_v + p[..., m:] @ near_v


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--text-file", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--other-text-file", default="/usr/share/common-licenses/LGPL-2.1")
    parser.add_argument("--context-len", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--keep-ratio", type=float, default=0.25)
    parser.add_argument("--sink-tokens", type=int, default=4)
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    c, n = args.chunk_size, args.context_len
    if n < 3 * c:
        raise SystemExit("--context-len must hold at least three chunks")
    server_args = ServerArgs(model_path=args.model_path, device="cpu", max_total_tokens=n + 16,
                             num_threads=args.num_threads, log_level="warning")
    runner = ModelRunner(server_args)
    tokenizer = runner.tokenizer
    ids = torch.tensor(tokenizer.encode(read_text(args.text_file))[:n])
    other_ids = torch.tensor(tokenizer.encode(read_text(args.other_text_file))[:n])
    if ids.numel() < n:
        raise SystemExit(f"{args.text_file} has fewer than {n} tokens")
    pool = runner.token_to_kv_pool
    recorder, kv = QueryRecorder(), {}
    observed_prefill(runner, ids, recorder, inspect=lambda slots: kv.update(
        k=[b[:, slots].float().clone() for b in pool.k_buffer],
        v=[b[:, slots].float().clone() for b in pool.v_buffer]))
    other = QueryMeanObserver(pool.num_layers, pool.num_kv_heads, pool.head_dim, runner.device)
    observed_prefill(runner, other_ids, other)
    random_prior = measure_query_prior(runner)

    h, d = pool.num_kv_heads, pool.head_dim
    n_hist = (n // c - 2)  # chunks clustered; the next one stays raw, the last one asks
    hist, q_start = n_hist * c, (n // c - 1) * c
    q_pos = torch.arange(q_start, n)
    target = max(1, round(args.keep_ratio * c))
    protected = torch.zeros(n_hist, c, dtype=torch.bool)
    protected[0, :args.sink_tokens] = True
    errors = {name: 0.0 for name in PRIORS}
    for layer in range(pool.num_layers):
        k, v, q = kv["k"][layer], kv["v"][layer], recorder.queries[layer]  # q [T, Hq, D]
        group = q.shape[1] // h
        q_groups = q.transpose(0, 1).reshape(h, group, -1, d)  # [H, G, T, D]
        keys = k[:, :hist].reshape(h, n_hist, c, d).transpose(0, 1)  # [N, H, C, D]
        values = v[:, :hist].reshape(h, n_hist, c, d).transpose(0, 1)
        merged = chunked_soft_matching(keys, values, target=target, round_fraction=0.125,
                                       min_similarity=0.0, protected=protected)
        m = merged.keys.shape[2]
        means = {
            "own": q_groups[:, :, :hist].reshape(h, group, n_hist, c, d).mean(dim=(1, 3)),
            "whole": q_groups.mean(dim=(1, 2))[:, None].expand(h, n_hist, d),
            "other": other.mean()[layer][:, None].expand(h, n_hist, d),
            "random": random_prior[layer][:, None].expand(h, n_hist, d),
        }
        logw = merged.sizes.clamp(min=1e-30).log()
        full = [history_attention(q_groups[head, :, q_start:], k[head, :hist], v[head, :hist],
                                  torch.zeros(hist), k[head, hist:], v[head, hist:], q_pos, hist)
                for head in range(h)]
        for name in PRIORS:
            if name == "none":
                ck, cv = merged.keys, merged.values
            else:
                prior = means[name].transpose(0, 1).reshape(-1, d)  # [N * H, D]
                ck, cv = query_weighted_centroids(
                    keys.reshape(-1, c, d), values.reshape(-1, c, d),
                    merged.assignment.reshape(-1, c), m, prior, d ** -0.5)
                ck, cv = ck.view(n_hist, h, m, d), cv.view(n_hist, h, m, d)
            for head in range(h):
                comp = history_attention(q_groups[head, :, q_start:], ck[:, head].reshape(-1, d),
                                         cv[:, head].reshape(-1, d), logw[:, head].reshape(-1),
                                         k[head, hist:], v[head, hist:], q_pos, hist)
                err = ((comp - full[head]).norm(dim=-1) ** 2
                       / full[head].norm(dim=-1) ** 2).mean()
                errors[name] += err.item() / (pool.num_layers * h)
    print("prior | relative squared error of the attention output")
    print("--- | ---")
    for name in PRIORS:
        print(f"{name} | {errors[name]:.4f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "errors": errors}, f, indent=1)


if __name__ == "__main__":
    main()
