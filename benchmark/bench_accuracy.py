"""Long-context accuracy of KV policies against the full cache, on one model.

    python benchmark/bench_accuracy.py --policies none chelsea:keep=0.5 chelsea:keep=0.2 \
        streaming:keep=0.2 --tasks passkey kl --context-lens 2048 4096 8192 --num-keys 5 \
        --output results/accuracy.json --plot docs/img/accuracy_vs_kv.png

Policy specs: ``none``; ``chelsea:keep=R,round=F,sim=S,chunk=C,bias=0|1,sink=N,recent=W``;
``chelsea:...,window=F`` in place of ``recent=W`` keeps F x context tokens raw (rounded to
whole chunks, at least one), scaling with the context as streaming's window does;
``chelsea:...,recall=N`` adds recall of N raw tokens per query head from the host tier;
``clusterkv:keep=R,tpc=T,window=W,sink=N,full=F`` (a decode budget of R x context tokens;
``offload=1`` adds ``--kv-offload``, ``host=H`` its ``--hicache-ratio``);
``streaming:keep=R`` (sinks + a recent window of R x context tokens: the same memory as
Chelsea at keep R); ``snapkv:keep=R,window=W,kernel=K`` (when prefill ends, the last W
prompt tokens pick R x context - W earlier tokens per layer and KV head: R x context slots
in all, streaming's memory at keep R) or ``snapkv:budget=N,window=W`` (N tokens picked).
Prompts are prefilled one chunk per step, so a question never sees raw context that a
policy would compress (the question is fed after compression), except with SnapKV, which
compresses once the whole prompt, question included, is in: the question picks.

Tasks:
- passkey: the plain passkey prompt of environment.md, ``--num-keys`` keys at evenly
  spread depths per context length; greedy; correct if the key is in the answer.
- passkey_digits: the same prompts and keys, with the answer constrained (SGLang's
  ``regex``) to a space and five digits: whether the key is retrieved, apart from whether
  the model chooses to answer with a number at all (at 8k SmolLM2's first answer token is a
  close call between " " and " the", even with the full cache).
- niah_multikey: ``--num-keys`` cases per context length of four "special magic number
  for KEY" needles at spread depths, one key asked (RULER's multi-key needle); correct if
  the asked number is in the answer.
- vt: ``--num-keys`` cases of RULER-style variable tracking (a chain of three variables
  holding one number, spread through the filler); score = share of the chain's names in
  the answer.
- kl: teacher-forced next-token distributions on ``--kl-tokens`` tokens of real English
  text found on the machine; mean KL(full || policy), top-1 agreement with the full
  cache and perplexity, over positions after the first chunk.
- ppl: teacher-forced perplexity of the first ``context_len`` tokens of that text, for
  each context length (positions after the first chunk).

Results: one JSON list (a row per policy x task x context length); ``--plot`` draws
accuracy (or KL / perplexity) against the KV kept, a line per policy family.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

from sglang_chelsea import Engine
from sglang_chelsea.utils.long_context_tasks import (TaskCase, multikey_needle_case,
                                                     passkey_prompt, variable_tracking_case)

TEXT_CANDIDATES = ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/GFDL-1.3",
                   "/usr/share/common-licenses/Apache-2.0", "/usr/share/common-licenses/LGPL-3"]


@dataclass
class Policy:
    """A parsed policy spec."""

    spec: str
    name: str
    keep: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)

    def engine_args(self, context_len: int) -> dict[str, Any]:
        if self.name == "none":
            return {"kv_compression": "none"}
        if self.name == "streaming":
            return {"kv_compression": "streaming", "chelsea_chunk_size": int(self.args.get("chunk", 128)),
                    "streaming_window": max(1, int(self.keep * context_len))}
        if self.name == "snapkv":
            window = int(self.args.get("window", 32))
            budget = int(self.args.get("budget", int(self.keep * context_len) - window))
            return {"kv_compression": "snapkv", "chelsea_chunk_size": int(self.args.get("chunk", 128)),
                    "snapkv_budget": max(1, budget), "snapkv_window": window,
                    "snapkv_kernel_size": int(self.args.get("kernel", 7))}
        if self.name == "clusterkv":
            return {"kv_compression": "clusterkv",
                    "clusterkv_budget": max(1, int(self.keep * context_len)),
                    "clusterkv_tokens_per_cluster": int(self.args.get("tpc", 32)),
                    "clusterkv_window": int(self.args.get("window", 512)),
                    "clusterkv_sink_tokens": int(self.args.get("sink", 16)),
                    "clusterkv_full_layers": int(self.args.get("full", 2)),
                    "kv_offload": bool(int(self.args.get("offload", 0))),
                    "hicache_ratio": float(self.args.get("host", 4.0))}
        chunk = int(self.args.get("chunk", 128))
        recent = int(self.args.get("recent", 1))
        if "window" in self.args:
            if "recent" in self.args:
                raise ValueError(f"{self.spec!r}: give recent=W or window=F, not both")
            recent = max(1, round(float(self.args["window"]) * context_len / chunk))
        return {
            "kv_compression": "chelsea", "chelsea_keep_ratio": self.keep,
            "chelsea_chunk_size": chunk,
            "chelsea_round_fraction": float(self.args.get("round", 0.125)),
            "chelsea_min_similarity": float(self.args.get("sim", 0.0)),
            "chelsea_size_bias": bool(int(self.args.get("bias", 1))),
            "chelsea_query_weighting": bool(int(self.args.get("qw", 0))),
            "chelsea_representative": self.args.get("rep", "mean"),
            "chelsea_sink_tokens": int(self.args.get("sink", 4)),
            "chelsea_recent_chunks": recent,
            "chelsea_recall_budget": int(self.args.get("recall", 0)),
        }


def parse_policy(spec: str) -> Policy:
    name, _, rest = spec.partition(":")
    if name not in ("none", "chelsea", "clusterkv", "streaming", "snapkv"):
        raise ValueError(f"unknown policy {name!r} in {spec!r}")
    args: dict[str, Any] = {}
    for part in filter(None, rest.split(",")):
        key, _, value = part.partition("=")
        args[key] = value
    keep = float(args.pop("keep", 1.0))
    return Policy(spec, name, keep, args)


NUM_THREADS: Optional[int] = None


def make_engine(policy: Policy, context_len: int, model_path: Optional[str]) -> Engine:
    chunk = int(policy.args.get("chunk", 128))
    return Engine(model_path=model_path, max_total_tokens=context_len + 1024, log_level="warning",
                  chunked_prefill_size=chunk, disable_radix_cache=True, num_threads=NUM_THREADS,
                  **policy.engine_args(context_len))


@contextmanager
def observing_steps(engine: Engine, observe: Callable[[], None]) -> Iterator[None]:
    """Call ``observe()`` after every scheduler step of ``engine`` inside the block."""
    sched = engine.scheduler
    step = sched.step

    def observed() -> Any:
        out = step()
        observe()
        return out

    sched.step = observed
    try:
        yield
    finally:
        sched.step = step


def peak_slots_during(engine: Engine, run: Callable[[], Any]) -> tuple[Any, int]:
    """``run()``'s result and the most device KV slots in use after any scheduler step
    (one request at a time: that request's slots, the prefill chunk being compressed
    included)."""
    sched = engine.scheduler
    peak = 0

    def record() -> None:
        nonlocal peak
        peak = max(peak, sched.max_total_num_tokens - sched.allocator.available_size())

    with observing_steps(engine, record):
        out = run()
    return out, peak


# The passkey task's answer in a fixed format: a space and the key's five digits (keys are
# drawn from 10000-99999), as SGLang's ``regex`` sampling parameter.
PASSKEY_DIGITS_REGEX = " [0-9]{5}"
PASSKEY_FORMATS: dict[str, Optional[str]] = {"passkey": None, "passkey_digits": PASSKEY_DIGITS_REGEX}


def passkey_keys(context_len: int, num_keys: int, seed: int) -> list[tuple[int, float]]:
    """The passkey task's (key, depth) cases for one context length: ``num_keys`` keys at
    evenly spread depths, drawn from ``seed``."""
    rng = random.Random(seed + context_len)
    return [(rng.randint(10000, 99999), (i + 0.5) / num_keys) for i in range(num_keys)]


def run_passkey(engine: Engine, context_len: int, num_keys: int, seed: int,
                regex: Optional[str] = None) -> dict[str, Any]:
    """Greedy passkey answers; with ``regex``, the answer is constrained to it (the same
    prompts and keys), which takes the answer's format out of what is scored."""
    hits, cases = 0, []
    params: dict[str, Any] = {"temperature": 0, "max_new_tokens": 10}
    if regex is not None:
        params["regex"] = regex
    for key, depth in passkey_keys(context_len, num_keys, seed):
        prompt = passkey_prompt(engine.tokenizer, key, context_len, depth)
        out, peak = peak_slots_during(engine, lambda: engine.generate(prompt, params))
        ok = str(key) in out["text"]
        hits += ok
        tokens = out["meta_info"]["prompt_tokens"] + out["meta_info"]["completion_tokens"]
        cases.append({"key": key, "depth": round(depth, 3), "answer": out["text"], "ok": ok,
                      "peak_device_fraction": round(peak / tokens, 4)})
    kv = engine.get_server_info()["kv_cache"]
    return {"accuracy": hits / num_keys, "cases": cases, "kv_after": kv,
            "peak_device_fraction": max(c["peak_device_fraction"] for c in cases)}


CASE_BUILDERS = {"niah_multikey": multikey_needle_case, "vt": variable_tracking_case}


def run_cases(engine: Engine, task: str, context_len: int, num_cases: int, seed: int
              ) -> dict[str, Any]:
    """Mean score of ``num_cases`` synthetic cases of ``task`` (greedy)."""
    rng = random.Random(f"{task}-{seed}-{context_len}")
    cases: list[TaskCase] = [CASE_BUILDERS[task](engine.tokenizer, rng, context_len)
                             for _ in range(num_cases)]
    scores, records = [], []
    for case in cases:
        out = engine.generate(case.prompt, {"temperature": 0,
                                            "max_new_tokens": case.max_new_tokens})
        scores.append(case.score(out["text"]))
        records.append({"answers": case.answers, "answer": out["text"], "score": scores[-1]})
    return {"accuracy": sum(scores) / len(scores), "cases": records}


class LogitsRecorder:
    """Wraps a ModelRunner's forward to keep the logits of every extend pass."""

    def __init__(self, engine: Engine) -> None:
        self.runner = engine.scheduler.model_runner
        self.original = self.runner.forward
        self.allocator = engine.scheduler.allocator
        self.rows: list[torch.Tensor] = []
        self.peak_slots = 0
        self.runner.forward = self._forward  # type: ignore[method-assign]

    def _forward(self, fb: Any) -> torch.Tensor:
        # Slots in use when a pass starts: the (compressed) history plus this step's raw tokens.
        used = self.allocator.size - self.allocator.available_size()
        self.peak_slots = max(self.peak_slots, used)
        logits = self.original(fb)
        if fb.forward_mode.is_extend():
            self.rows.append(logits.clone())
        return logits

    def logits(self, n: int) -> torch.Tensor:
        return torch.cat(self.rows)[:n]

    def close(self) -> None:
        self.runner.forward = self.original  # type: ignore[method-assign]


def teacher_forced_logprobs(engine: Engine, ids: list[int]) -> tuple[torch.Tensor, float]:
    """Log-probabilities at positions 0..n-2 (predicting tokens 1..n-1) under the policy,
    with the whole text prefilled chunk by chunk; and the peak KV slots in use as a
    fraction of the text length (1.0 for the full cache)."""
    recorder = LogitsRecorder(engine)
    try:
        engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0},
                        return_logprob=True, logprob_start_len=0)
        logits = recorder.logits(len(ids) - 1)
    finally:
        recorder.close()
    return torch.log_softmax(logits.float(), dim=-1), recorder.peak_slots / len(ids)


def perplexity(got: torch.Tensor, ids: list[int], skip: int) -> float:
    """exp(mean NLL) of tokens ``skip+1..`` given log-probabilities at positions ``0..``."""
    got = got[skip:]
    targets = torch.tensor(ids[skip + 1:skip + 1 + got.shape[0]])
    return float((-got.gather(1, targets.unsqueeze(1)).squeeze(1)).mean().exp())


def kl_metrics(ref: torch.Tensor, got: torch.Tensor, ids: list[int], skip: int) -> dict[str, float]:
    kl = (ref[skip:].exp() * (ref[skip:] - got[skip:])).sum(-1)
    return {
        "kl": float(kl.mean()),
        "top1_agreement": float((ref[skip:].argmax(-1) == got[skip:].argmax(-1)).float().mean()),
        "ppl": perplexity(got, ids, skip),
    }


def read_text(path: Optional[str]) -> str:
    for candidate in ([path] if path else TEXT_CANDIDATES):
        if candidate and os.path.exists(candidate):
            with open(candidate, encoding="utf-8", errors="ignore") as f:
                return f.read()
    raise FileNotFoundError("no English text file found; pass --text-file")


PANELS = {  # task -> (result key, y label, log scale)
    "passkey": ("accuracy", "passkey accuracy", False),
    "passkey_digits": ("accuracy", "passkey accuracy, answer format fixed", False),
    "niah_multikey": ("accuracy", "multi-key needle accuracy", False),
    "vt": ("accuracy", "variable tracking score", False),
    "kl": ("kl", "KL(full || policy) on real text", True),
    "ppl": ("ppl", "perplexity on real text", False),
}


def plot(results: list[dict[str, Any]], path: str) -> None:
    """One panel per task present: its metric (mean over context lengths) vs KV kept,
    a line per policy family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in PANELS if any(r["task"] == t for r in results)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 4), squeeze=False)
    for task, ax in zip(tasks, axes[0]):
        key, ylabel, log = PANELS[task]
        for family in sorted({r["policy_family"] for r in results}):
            by_keep: dict[float, list[float]] = {}
            for r in results:
                if r["policy_family"] == family and r["task"] == task:
                    by_keep.setdefault(r["kv_kept"], []).append(r[key])
            means = {x: sum(v) / len(v) for x, v in sorted(by_keep.items())}
            if family == "none" and means:
                ax.axhline(means[1.0], ls="--", color="gray", label="full cache")
            elif means:
                ax.plot(list(means), list(means.values()), marker="o", label=family)
        lens = sorted({r["context_len"] for r in results if r["task"] == task})
        ax.set(xlabel="KV kept (fraction of the full cache)", ylabel=ylabel,
               title=f"{task} (context {', '.join(map(str, lens))})")
        if log:
            ax.set_yscale("log")
        if key == "accuracy":
            ax.set_ylim(-0.05, 1.05)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", type=str, default=None)
    parser.add_argument("--policies", nargs="+", default=["none", "chelsea:keep=0.5"])
    parser.add_argument("--tasks", nargs="+", default=["passkey", "kl"], choices=list(PANELS))
    parser.add_argument("--context-lens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--num-keys", type=int, default=5,
                        help="cases per context length of passkey, niah_multikey and vt")
    parser.add_argument("--kl-tokens", type=int, default=4096)
    parser.add_argument("--text-file", type=str, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=str, default="accuracy.json")
    parser.add_argument("--plot", type=str, default=None)
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch threads (1 avoids oversubscription on a busy machine)")
    args = parser.parse_args(argv)
    global NUM_THREADS
    NUM_THREADS = args.num_threads
    policies = [parse_policy(s) for s in args.policies]
    results: list[dict[str, Any]] = []
    ref_logprobs: Optional[torch.Tensor] = None
    text_ids: list[int] = []
    if "kl" in args.tasks or "ppl" in args.tasks:
        engine = make_engine(parse_policy("none"), args.kl_tokens, args.model_path)
        text_ids = engine.tokenizer.encode(read_text(args.text_file))
        if "kl" in args.tasks:
            ref_logprobs, _ = teacher_forced_logprobs(engine, text_ids[: args.kl_tokens])
        engine.shutdown()
    for policy in policies:
        family = policy.spec.split(":")[0] if policy.name != "chelsea" else \
            "chelsea" + "".join(f" {k}={v}" for k, v in sorted(policy.args.items()))
        base = {"policy": policy.spec, "policy_family": family, "kv_kept": policy.keep}
        if "kl" in args.tasks:
            assert ref_logprobs is not None
            engine = make_engine(policy, args.kl_tokens, args.model_path)
            t0 = time.perf_counter()
            kl_ids = text_ids[: args.kl_tokens]
            got, peak = teacher_forced_logprobs(engine, kl_ids)
            kv = engine.get_server_info()["kv_cache"]
            row = {**base, "task": "kl", "context_len": len(kl_ids), "peak_kv_fraction": round(peak, 4),
                   **kl_metrics(ref_logprobs, got, kl_ids, skip=128),
                   "seconds": round(time.perf_counter() - t0, 1),
                   "clustering_seconds": kv.get("clustering_seconds")}
            results.append(row)
            print(json.dumps(row), flush=True)
            engine.shutdown()
        for task in [t for t in args.tasks if t in PASSKEY_FORMATS]:
            for ctx in args.context_lens:
                engine = make_engine(policy, ctx, args.model_path)
                t0 = time.perf_counter()
                res = run_passkey(engine, ctx, args.num_keys, args.seed, PASSKEY_FORMATS[task])
                row = {**base, "task": task, "context_len": ctx, "accuracy": res["accuracy"],
                       "peak_device_fraction": res["peak_device_fraction"],
                       "cases": res["cases"], "seconds": round(time.perf_counter() - t0, 1)}
                results.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "cases"}), flush=True)
                engine.shutdown()
        for task in [t for t in args.tasks if t in CASE_BUILDERS]:
            for ctx in args.context_lens:
                engine = make_engine(policy, ctx, args.model_path)
                t0 = time.perf_counter()
                res = run_cases(engine, task, ctx, args.num_keys, args.seed)
                row = {**base, "task": task, "context_len": ctx, **res,
                       "seconds": round(time.perf_counter() - t0, 1)}
                results.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "cases"}), flush=True)
                engine.shutdown()
        if "ppl" in args.tasks:
            for ctx in args.context_lens:
                engine = make_engine(policy, ctx, args.model_path)
                t0 = time.perf_counter()
                got, peak = teacher_forced_logprobs(engine, text_ids[:ctx])
                row = {**base, "task": "ppl", "context_len": ctx,
                       "ppl": perplexity(got, text_ids[:ctx], skip=128),
                       "peak_kv_fraction": round(peak, 4),
                       "seconds": round(time.perf_counter() - t0, 1)}
                results.append(row)
                print(json.dumps(row), flush=True)
                engine.shutdown()
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    print("\npolicy | task | context | accuracy / KL | top-1 | ppl | peak KV fraction")
    print("--- | --- | --- | --- | --- | --- | ---")
    for r in results:
        if r["task"] == "ppl":
            print(f"{r['policy']} | ppl | {r['context_len']} | | | {r['ppl']:.2f} | "
                  f"{r['peak_kv_fraction']:.3f}")
        elif r["task"] != "kl":
            print(f"{r['policy']} | {r['task']} | {r['context_len']} | {r['accuracy']:.2f} | | |")
        else:
            print(f"{r['policy']} | kl | {r['context_len']} | {r['kl']:.4f} | "
                  f"{r['top1_agreement']:.3f} | {r['ppl']:.2f} | {r['peak_kv_fraction']:.3f}")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
