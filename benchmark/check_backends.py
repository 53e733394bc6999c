"""Check an attention backend against the torch reference backend, end to end, on any device.

    python benchmark/check_backends.py --model-path MODEL [--device cuda] \
        [--dtype float32 bfloat16] [--backend triton|flashinfer] [--batch-size 4] \
        [--input-len 300] [--load-format dummy]

For each dtype and KV policy (full cache; Chelsea keep 0.5 with 32-token chunks), the same
greedy requests (a batch, then a radix hit on the first prompt's prefix) run through an
engine on the torch backend and one on the checked backend. Prints, per case, whether the
output tokens are identical and the largest difference of their logprobs, and appends
the rows as JSON lines to --result-filename.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from sglang_chelsea import Engine

POLICIES: dict[str, dict[str, Any]] = {
    "none": {},
    "chelsea-0.5": {"kv_compression": "chelsea", "chelsea_chunk_size": 32,
                    "chelsea_keep_ratio": 0.5},
}


def run(model_path: str, backend: str, dtype: str, device: str, prompts: list[list[int]],
        output_len: int, policy: dict[str, Any], load_format: str = "auto") -> list[dict]:
    """Greedy outputs with logprobs: the batch, then the first prompt with a new ending."""
    need = (len(prompts) + 1) * (len(prompts[0]) + output_len) + 64
    engine = Engine(model_path=model_path, attention_backend=backend, dtype=dtype,
                    device=device, max_total_tokens=need, log_level="warning",
                    chunked_prefill_size=128, load_format=load_format,
                    skip_tokenizer_init=load_format == "dummy", **policy)
    params = {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}
    try:
        outs = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
        hit_ids = prompts[0][: len(prompts[0]) - 20] + prompts[-1][:20]
        outs.append(engine.generate(input_ids=hit_ids, sampling_params=params,
                                    return_logprob=True))
        return outs
    finally:
        engine.shutdown()


def compare(ref: list[dict], got: list[dict]) -> dict[str, Any]:
    """Identical-token share and the max logprob gap over the common prefix of each output."""
    same = total = 0
    gap = 0.0
    for a, b in zip(ref, got):
        ids_a, ids_b = a["output_ids"], b["output_ids"]
        total += len(ids_a)
        n = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), len(ids_a))
        same += n
        lp_a = [lp for lp, _, _ in a["meta_info"]["output_token_logprobs"][:n]]
        lp_b = [lp for lp, _, _ in b["meta_info"]["output_token_logprobs"][:n]]
        gap = max([gap] + [abs(x - y) for x, y in zip(lp_a, lp_b)])
    return {"tokens_identical_share": round(same / total, 4), "max_logprob_gap": gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--load-format", default="auto",
                        help="dummy: random weights of a config-only model directory")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=300)
    parser.add_argument("--output-len", type=int, default=24)
    parser.add_argument("--result-filename", default="check_backends.jsonl")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 20000, (args.batch_size, args.input_len), generator=gen).tolist()
    rows = []
    for dtype in args.dtype:
        for name, policy in POLICIES.items():
            ref = run(args.model_path, "torch", dtype, args.device, prompts, args.output_len,
                      policy, args.load_format)
            got = run(args.model_path, args.backend, dtype, args.device, prompts,
                      args.output_len, policy, args.load_format)
            row = {"backend": args.backend, "device": args.device, "dtype": dtype,
                   "policy": name, **compare(ref, got)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    with open(args.result_filename, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
