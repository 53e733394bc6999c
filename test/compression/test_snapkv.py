"""SnapKV: the window's scoring on planted keys, per-head compaction, and the policy inside
the engine (exactness when the budget covers the prompt, the slot schedule and no leak with
a small one, what each layer/head keeps, flags, passkey on SmolLM2 at a 20% budget)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from sglang_chelsea import Engine
from sglang_chelsea.compression.snapkv import (
    SnapKVPolicy,
    SnapKVState,
    compact_heads,
    snapkv_scores,
)
from sglang_chelsea.mem_cache.memory_pool import MHATokenToKVPool
from sglang_chelsea.server_args import ServerArgs
from sglang_chelsea.utils.long_context_tasks import passkey_prompt
from utils.runtime import assert_no_leak, random_ids

GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _snapkv(model_path: str, **kw) -> Engine:
    args = {"model_path": model_path, "max_total_tokens": 4000, "log_level": "warning",
            "kv_compression": "snapkv", "chelsea_chunk_size": 32, "chunked_prefill_size": 40,
            "snapkv_budget": 50, "snapkv_window": 16, "snapkv_kernel_size": 3}
    args.update(kw)
    return Engine(**args)


# ---------------------------------------------------------------------- scoring
def test_scores_pick_the_planted_tokens_per_kv_head() -> None:
    # 2 KV heads, 2 query heads each; 40 tokens, the last 4 are the window.
    g = torch.Generator().manual_seed(0)
    d, n, w = 16, 40, 4
    keys = 0.1 * torch.randn(2, n, d, generator=g)
    q = 0.1 * torch.randn(w, 4, d, generator=g)
    e0, e1 = torch.eye(d)[0], torch.eye(d)[1]
    keys[0, 7] = keys[0, 21] = 4 * e0  # KV head 0 plants at 7 and 21 (direction e0)
    keys[1, 30] = 4 * e1  # KV head 1 plants at 30 (direction e1)
    q[:, 0] += 4 * e0  # query head 0 (group of KV head 0) looks along e0
    q[:, 3] += 4 * e1  # query head 3 (group of KV head 1) looks along e1
    votes = snapkv_scores(q, keys, scaling=d ** -0.5, kernel_size=1)
    assert votes.shape == (2, n - w)
    assert set(votes[0].topk(2).indices.tolist()) == {7, 21}
    assert votes[1].argmax().item() == 30
    # Each window query's probabilities sum to 1 over all N keys: the prefix gets less.
    assert (votes.sum(dim=1) < 2 * w).all()
    # Pooling spreads a vote to its neighbours (kernel 3: one on each side).
    pooled = snapkv_scores(q, keys, scaling=d ** -0.5, kernel_size=3)
    assert pooled[1, 29] == pooled[1, 31] == votes[1, 30]
    assert torch.equal(pooled.topk(1).values, votes.topk(1).values)


def test_scores_match_a_per_query_reference() -> None:
    # Softmax over the keys up to each window query's own position (causal inside the
    # window), summed over the window and the query heads of each KV head's group.
    g = torch.Generator().manual_seed(1)
    d, n, w, n_kv, group = 8, 12, 3, 2, 3
    keys = torch.randn(n_kv, n, d, generator=g)
    q = torch.randn(w, n_kv * group, d, generator=g)
    want = torch.zeros(n_kv, n - w)
    for head in range(n_kv * group):
        for i in range(w):
            seen = keys[head // group, : n - w + i + 1]
            want[head // group] += torch.softmax(0.5 * seen @ q[i, head], -1)[: n - w]
    assert torch.allclose(snapkv_scores(q, keys, 0.5, 1), want, atol=1e-6)


def test_compaction_writes_each_heads_picks_into_the_first_slots() -> None:
    pool = MHATokenToKVPool(30, 1, 2, 4, torch.float32)
    for h in range(2):
        pool.k_buffer[0][h] = torch.arange(31, dtype=torch.float32)[:, None] + 100 * h
        pool.v_buffer[0][h] = -pool.k_buffer[0][h]
    slots = torch.tensor([9, 3, 20, 5, 11, 7])
    keep = torch.tensor([[1, 4, 5], [0, 2, 3]])  # positions into `slots`, per KV head
    compact_heads(pool, 0, slots, keep)
    assert pool.k_buffer[0][0, [9, 3, 20], 0].tolist() == [3, 11, 7]
    assert pool.k_buffer[0][1, [9, 3, 20], 0].tolist() == [109, 120, 105]
    assert torch.equal(pool.v_buffer[0][:, [9, 3, 20]], -pool.k_buffer[0][:, [9, 3, 20]])


# ---------------------------------------------------------------------- in the engine
def test_budget_covering_the_prompt_equals_the_full_cache(tiny_llama_dir: str) -> None:
    ids = random_ids(300, 1)
    full = Engine(model_path=tiny_llama_dir, max_total_tokens=4000, log_level="warning")
    want = full.generate(input_ids=ids, sampling_params=GREEDY, return_logprob=True)
    full.shutdown()
    engine = _snapkv(tiny_llama_dir, snapkv_budget=300)
    assert engine.server_args.disable_radix_cache  # kept tokens depend on the prompt's end
    got = engine.generate(input_ids=ids, sampling_params=GREEDY, return_logprob=True)
    assert engine.get_server_info()["kv_cache"]["evicted_tokens"] == 0
    engine.shutdown()
    assert got["output_ids"] == want["output_ids"]
    lp = [x for x, _, _ in got["meta_info"]["output_token_logprobs"]]
    ref = [x for x, _, _ in want["meta_info"]["output_token_logprobs"]]
    assert lp == pytest.approx(ref, abs=1e-5)


def test_small_budget_keeps_budget_plus_window_and_frees_the_rest(tiny_llama_dir: str) -> None:
    engine = _snapkv(tiny_llama_dir)
    sched = engine.scheduler
    seen: dict[str, list[tuple[int, int, int]]] = {}
    original = sched.model_runner.forward

    def spy(fb):  # (logical, physical, sum of page_lens) of each request at each decode step
        for req in sched.running if fb.forward_mode.is_decode() else []:
            seen.setdefault(req.rid, []).append(
                (req.logical_len, req.physical_len, sum(req.page_lens)))
        return original(fb)

    sched.model_runner.forward = spy
    prompts = [random_ids(300, 2), random_ids(250, 3)]  # batched, chunked prefill
    outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    page = 32
    for out, prompt in zip(outs, prompts):
        steps = seen[out["meta_info"]["id"]]
        assert len(steps) == GREEDY["max_new_tokens"] - 1
        for logical, physical, _ in steps:
            assert physical == 50 + 16 + logical - len(prompt)  # budget + window + generated
        # Once the page the window starts in completes, the completed pages account for
        # every slot but the raw tail of the open page (before, that page's compacted
        # prefix slots sit in the tail too).
        window_page_end = ((len(prompt) - 16) // page + 1) * page
        after = [s for s in steps if s[0] >= window_page_end]
        assert after
        for logical, physical, in_pages in after:
            assert physical - in_pages == logical % page
    kv = engine.get_server_info()["kv_cache"]
    assert kv["snapkv_compressed_reqs"] == 2
    assert kv["evicted_tokens"] == (300 - 16 - 50) + (250 - 16 - 50)
    assert_no_leak(engine)
    engine.shutdown()


def test_each_layer_and_head_keeps_its_top_budget_tokens(tiny_llama_dir: str) -> None:
    engine = _snapkv(tiny_llama_dir, snapkv_budget=40, snapkv_window=8)
    sched = engine.scheduler
    policy: SnapKVPolicy = sched.kv_compressor
    pool = sched.token_to_kv_pool
    checked: list[int] = []
    evict = policy._evict

    def checking_evict(scheduler, req, state: SnapKVState) -> None:
        row = scheduler.req_to_token_pool.req_to_token[req.req_pool_idx]
        slots = row[:state.end].to(torch.int64)
        before = [pool.k_buffer[layer][:, slots].clone() for layer in range(pool.num_layers)]
        queries = [torch.cat(q) for q in state.queries]
        evict(scheduler, req, state)
        assert req.physical_len == 40 + 8
        kept = row[:40].to(torch.int64)
        for layer in range(pool.num_layers):
            votes = snapkv_scores(queries[layer], before[layer], state.scaling, 3)
            for h in range(pool.num_kv_heads):
                want = before[layer][h, votes[h].topk(40).indices.sort().values]
                assert torch.equal(pool.k_buffer[layer][h, kept], want)
            # The window's keys follow, untouched.
            window = row[40:48].to(torch.int64)
            assert torch.equal(pool.k_buffer[layer][:, window], before[layer][:, -8:])
        checked.append(req.logical_len)

    policy._evict = checking_evict
    engine.generate(input_ids=random_ids(200, 4), sampling_params=GREEDY)
    assert checked == [200]
    assert_no_leak(engine)
    engine.shutdown()


def test_retracted_request_is_scored_again_and_nothing_leaks(tiny_llama_dir: str) -> None:
    # A pool too small for both requests to decode to the end: one is retracted, then
    # re-prefills its prompt and output and is compressed again.
    engine = _snapkv(tiny_llama_dir, max_total_tokens=180, snapkv_budget=30,
                     chunked_prefill_size=64)
    params = {"temperature": 0, "max_new_tokens": 60, "ignore_eos": True}
    outs = engine.generate(input_ids=[random_ids(120, 5), random_ids(120, 6)],
                           sampling_params=params)
    assert [o["meta_info"]["completion_tokens"] for o in outs] == [60, 60]
    assert engine.get_server_info()["kv_cache"]["snapkv_compressed_reqs"] == 3
    assert_no_leak(engine)
    engine.shutdown()


def test_snapkv_passkey_at_a_20_percent_budget(default_model_path: str) -> None:
    engine = Engine(model_path=default_model_path, max_total_tokens=5000, log_level="warning",
                    kv_compression="snapkv", snapkv_budget=400)
    params = {"temperature": 0, "max_new_tokens": 8}
    for key, depth in [(71432, 0.25), (50918, 0.75)]:
        prompt = passkey_prompt(engine.tokenizer, key, 2000, depth)
        assert str(key) in engine.generate(prompt, sampling_params=params)["text"]
    assert engine.get_server_info()["kv_cache"]["snapkv_compressed_reqs"] == 2
    engine.shutdown()


def test_snapkv_flags_are_checked() -> None:
    with pytest.raises(ValueError, match="snapkv_budget"):
        ServerArgs(kv_compression="snapkv", snapkv_budget=0)
    with pytest.raises(ValueError, match="snapkv_window"):
        ServerArgs(kv_compression="snapkv", snapkv_window=0)
    with pytest.raises(ValueError, match="snapkv_kernel_size must be odd"):
        ServerArgs(kv_compression="snapkv", snapkv_kernel_size=4)
    with pytest.raises(ValueError, match="tp-size"):
        ServerArgs(kv_compression="snapkv", tp_size=2, device="cpu")
    args = ServerArgs(kv_compression="snapkv")
    assert (args.snapkv_budget, args.snapkv_window, args.snapkv_kernel_size) == (1024, 32, 7)
    assert args.disable_radix_cache


def test_triton_backend_gives_the_torch_backends_outputs(tiny_llama_dir: str) -> None:
    # The window's queries reach the policy from the backend-independent forward(), and the
    # compacted slots all have weight 1: the Triton kernels need nothing of their own.
    # (On the CPU they run through the Triton interpreter.)
    outs = []
    for backend in ("torch", "triton"):
        engine = _snapkv(tiny_llama_dir, attention_backend=backend, snapkv_budget=30)
        assert type(engine.scheduler.model_runner.attn_backend).__name__.lower().startswith(
            backend)
        outs.append(engine.generate(input_ids=[random_ids(120, 7), random_ids(90, 8)],
                                    sampling_params={**GREEDY, "max_new_tokens": 6},
                                    return_logprob=True))
        assert engine.get_server_info()["kv_cache"]["snapkv_compressed_reqs"] == 2
        engine.shutdown()
    for a, b in zip(*outs):
        assert a["output_ids"] == b["output_ids"]
        lp_a = [lp for lp, _, _ in a["meta_info"]["output_token_logprobs"]]
        lp_b = [lp for lp, _, _ in b["meta_info"]["output_token_logprobs"]]
        assert lp_a == pytest.approx(lp_b, abs=1e-4)
