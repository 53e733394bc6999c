"""Grammar libraries on the CPU: compile time and per-token mask time on the default model's
tokenizer, for a regex and a JSON schema (how docs/structured-outputs.md chose the backend).

For each installed library (xgrammar, llguidance) and each grammar: the one-time tokenizer
setup, the compile time (a fresh compiler/cache, so nothing is reused), and the time to fill
one token mask and accept one token, averaged over a greedy walk that follows the grammar
with a fixed pseudo-random choice among the allowed tokens.

    python benchmark/bench_grammar.py [--steps 64] [--json results/bench_grammar.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from importlib.metadata import version
from typing import Any, Callable

import torch

from sglang_chelsea.model_loader import default_model_path, load_tokenizer

REGEX = r"((25[0-5]|2[0-4]\d|[01]?\d\d?)\.){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "population": {"type": "integer"},
        "area_km2": {"type": "number"},
        "country": {"type": "string", "maxLength": 40},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 30},
                      "maxItems": 3},
    },
    "required": ["name", "population", "area_km2", "country", "landmarks"],
    "additionalProperties": False,
}


def allowed_ids(bitmask: torch.Tensor, vocab: int) -> list[int]:
    """The token ids whose bit is set in row 0 of an int32 bitmask."""
    bits = (bitmask[0].unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab].nonzero().flatten().tolist()


def walk(fill: Callable[[], None], accept: Callable[[int], None], done: Callable[[], bool],
         bitmask: torch.Tensor, vocab: int, steps: int, eos: int
         ) -> tuple[float, float, float, int]:
    """Follow the grammar ``steps`` tokens; returns (first fill ms, mean fill ms of the later
    steps, mean accept ms, steps)."""
    rng = random.Random(0)
    fills, accepts = [], []
    for _ in range(steps):
        if done():
            break
        t0 = time.perf_counter()
        fill()
        t1 = time.perf_counter()
        ids = [i for i in allowed_ids(bitmask, vocab) if i != eos] or [eos]
        tok = rng.choice(ids)
        t2 = time.perf_counter()
        accept(tok)
        t3 = time.perf_counter()
        fills.append(t1 - t0)
        accepts.append(t3 - t2)
    later = fills[1:] or fills
    mean_ms = statistics.mean
    return fills[0] * 1e3, mean_ms(later) * 1e3, mean_ms(accepts) * 1e3, len(fills)


def result_row(library: str, kind: str, setup_s: float, compile_s: float,
               stats: tuple[float, float, float, int]) -> dict[str, Any]:
    first_ms, mask_ms, accept_ms, steps = stats
    return {"library": f"{library} {version(library)}", "grammar": kind,
            "tokenizer_setup_s": setup_s, "compile_ms": compile_s * 1e3,
            "first_mask_ms": first_ms, "mask_ms": mask_ms, "accept_ms": accept_ms,
            "steps": steps}


def bench_xgrammar(tokenizer: Any, vocab: int, eos: int, steps: int) -> list[dict[str, Any]]:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[eos])
    setup = time.perf_counter() - t0
    rows = []
    for kind, text in (("regex", REGEX), ("json_schema", json.dumps(SCHEMA))):
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        t0 = time.perf_counter()
        compiled = (compiler.compile_regex(text) if kind == "regex"
                    else compiler.compile_json_schema(text))
        compile_s = time.perf_counter() - t0
        matcher = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, vocab)
        stats = walk(lambda: matcher.fill_next_token_bitmask(bitmask), matcher.accept_token,
                     matcher.is_terminated, bitmask, vocab, steps, eos)
        rows.append(result_row("xgrammar", kind, setup, compile_s, stats))
    return rows


def bench_llguidance(tokenizer: Any, vocab: int, eos: int, steps: int) -> list[dict[str, Any]]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos)
    setup = time.perf_counter() - t0
    rows = []
    for kind, text in (("regex", REGEX), ("json_schema", json.dumps(SCHEMA))):
        grammar = (llguidance.LLMatcher.grammar_from_regex(text) if kind == "regex"
                   else llguidance.LLMatcher.grammar_from_json_schema(text))
        t0 = time.perf_counter()
        matcher = llguidance.LLMatcher(lltok, grammar)
        compile_s = time.perf_counter() - t0
        assert not matcher.is_error(), matcher.get_error()
        bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)
        stats = walk(
            lambda: llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0),
            matcher.consume_token, matcher.is_stopped, bitmask, vocab, steps, eos)
        rows.append(result_row("llguidance", kind, setup, compile_s, stats))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(default_model_path())
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    rows: list[dict[str, Any]] = []
    for name, bench in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
        try:
            rows += bench(tokenizer, vocab, eos, args.steps)
        except ImportError as exc:
            print(f"{name}: not installed ({exc})")
    print(f"{'library':<20} {'grammar':<12} {'setup s':>8} {'compile ms':>11} "
          f"{'1st mask ms':>12} {'mask ms':>8} {'accept ms':>10} {'steps':>6}")
    for r in rows:
        print(f"{r['library']:<20} {r['grammar']:<12} {r['tokenizer_setup_s']:>8.2f} "
              f"{r['compile_ms']:>11.1f} "
              f"{r['first_mask_ms']:>12.2f} {r['mask_ms']:>8.3f} {r['accept_ms']:>10.3f} "
              f"{r['steps']:>6}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
