"""How far each chunk of a prompt could merge at a similarity floor, per (layer, KV head).

Prefills one passkey prompt with Chelsea on and, for every chunk the engine clusters, also
runs Chunked Soft Matching with ``target=1`` and each ``--floors`` value as the similarity
floor (pairs below it never merge). Prints, per chunk and floor, the mean, 90th percentile
and maximum over (layer, KV head) of the slots left. The maximum is what a chunk's slot list
would need: every head shares it.

    python benchmark/chunk_similarity.py --context-len 2048 --depth 0.5 --floors 0.9 0.8 0.7
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

import torch

import sglang_chelsea.compression.chelsea as chelsea_module
from sglang_chelsea import Engine
from sglang_chelsea.kernels.chunked_soft_matching import chunked_soft_matching
from sglang_chelsea.utils.long_context_tasks import passkey_prompt


def floor_profile(keys: torch.Tensor, values: torch.Tensor, protected: torch.Tensor,
                  round_fraction: float, floors: list[float]) -> list[tuple[float, float, float]]:
    """(mean, p90, max) over problems of the slots left at each floor with ``target=1``."""
    rows = []
    for floor in floors:
        kept = chunked_soft_matching(keys, values, target=1, round_fraction=round_fraction,
                                     min_similarity=floor, protected=protected).num_kept
        kept = kept.float().view(-1)
        rows.append((kept.mean().item(), kept.quantile(0.9).item(), kept.max().item()))
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--context-len", type=int, default=2048)
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--key", type=int, default=71432)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--floors", type=float, nargs="+", default=[0.9, 0.8, 0.7])
    parser.add_argument("--num-threads", type=int, default=None)
    args = parser.parse_args(argv)

    profiles: list[list[tuple[float, float, float]]] = []
    matcher = chelsea_module.chunked_soft_matching

    def observed(keys: torch.Tensor, values: torch.Tensor, **kwargs: Any) -> Any:
        # One chunk per call: the prompt is prefilled one chunk per step.
        profiles.append(floor_profile(keys, values, kwargs["protected"],
                                      kwargs["round_fraction"], args.floors))
        return matcher(keys, values, **kwargs)

    chelsea_module.chunked_soft_matching = observed
    engine = Engine(model_path=args.model_path, kv_compression="chelsea",
                    chelsea_chunk_size=args.chunk_size, chunked_prefill_size=args.chunk_size,
                    max_total_tokens=args.context_len + 1024, disable_radix_cache=True,
                    log_level="warning", num_threads=args.num_threads)
    try:
        prompt = passkey_prompt(engine.tokenizer, args.key, args.context_len, args.depth)
        needle_at = len(engine.tokenizer.encode(prompt[: prompt.find(str(args.key))]))
        out = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 8})
    finally:
        engine.shutdown()
        chelsea_module.chunked_soft_matching = matcher
    print(f"needle in chunk {needle_at // args.chunk_size}; answer: {out['text']!r}")
    print("chunk | " + " | ".join(f"floor {f}: mean p90 max" for f in args.floors))
    for i, rows in enumerate(profiles):
        print(f"{i:5d} | " + " | ".join(f"{m:5.1f} {p:5.1f} {x:5.0f}" for m, p, x in rows))


if __name__ == "__main__":
    main()
