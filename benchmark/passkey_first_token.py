"""How close the passkey's first answer token is: " " (a number follows) against " the".

    python benchmark/passkey_first_token.py --policies none \
        chelsea:keep=0.1,chunk=64,recent=11,recall=384,rep=medoid --context-len 8160 \
        --seed 0 --cases 3 4 --num-threads 1

SmolLM2 writes the key as a space token and then one token per digit, so the plain passkey
task (``bench_accuracy.py --tasks passkey``) is decided at the first answer token: " "
starts the key, " the" starts "the pass key. The pass key is...". This script takes the
same prompts and keys as bench_accuracy (``--num-keys`` keys at spread depths; ``--cases``
picks some by index), generates one token per prompt through the engine's own path
(chunked prefill, compression and recall as served) and prints the log-probabilities of
the two candidates and their margin; ``bench_accuracy.py --tasks passkey_digits`` scores
the digits with the format fixed.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional

import bench_accuracy as ba
from sglang_chelsea.utils.long_context_tasks import passkey_prompt

CANDIDATES = (" ", " the")


def first_token_logprobs(engine: Any, prompt: str, top: int) -> tuple[str, dict[str, float]]:
    """The greedy first answer token and the log-probabilities of its ``top`` best
    candidates, by text."""
    out = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 1}, return_logprob=True,
                          top_logprobs_num=top, return_text_in_logprobs=True)
    return out["text"], {text: lp for lp, _, text in out["meta_info"]["output_top_logprobs"][0]}


def _rounded(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 3)


def _shown(x: Optional[float], fmt: str) -> str:
    return "below the top" if x is None else format(x, fmt)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", type=str, default=None)
    parser.add_argument("--policies", nargs="+", default=["none"])
    parser.add_argument("--context-len", type=int, default=8160)
    parser.add_argument("--num-keys", type=int, default=5)
    parser.add_argument("--cases", type=int, nargs="+", default=None,
                        help="indices of the keys to run (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=20,
                        help="candidates returned per prompt (one not among them reads null)")
    parser.add_argument("--output", type=str, default=None)
    parser.add_argument("--num-threads", type=int, default=None)
    args = parser.parse_args(argv)
    ba.NUM_THREADS = args.num_threads
    keys = ba.passkey_keys(args.context_len, args.num_keys, args.seed)
    cases = args.cases if args.cases is not None else list(range(args.num_keys))
    rows = []
    for spec in args.policies:
        engine = ba.make_engine(ba.parse_policy(spec), args.context_len, args.model_path)
        try:
            for key, depth in (keys[i] for i in cases):
                greedy, lps = first_token_logprobs(
                    engine, passkey_prompt(engine.tokenizer, key, args.context_len, depth),
                    args.top)
                space, the = (lps.get(c) for c in CANDIDATES)
                row = {"policy": spec, "context_len": args.context_len, "seed": args.seed,
                       "depth": round(depth, 3), "key": key, "greedy": greedy,
                       "logprob_space": _rounded(space), "logprob_the": _rounded(the),
                       "margin": None if space is None or the is None else round(space - the, 3)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            engine.shutdown()
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=1)
    print("\npolicy | depth | key | greedy | logprob ' ' | logprob ' the' | margin")
    print("--- | --- | --- | --- | --- | --- | ---")
    for r in rows:
        print(f"{r['policy']} | {r['depth']} | {r['key']} | {r['greedy']!r} | "
              f"{_shown(r['logprob_space'], '.2f')} | {_shown(r['logprob_the'], '.2f')} | "
              f"{_shown(r['margin'], '+.2f')}")


if __name__ == "__main__":
    main()
