"""Chelsea + recall: raw members of the best centroids recalled from the host tier."""

from __future__ import annotations

import pytest

from sglang_chelsea import Engine
from utils.runtime import random_ids
from sglang_chelsea.utils.long_context_tasks import passkey_prompt

GREEDY = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}



def _engine(model_path: str, **kw) -> Engine:
    args = dict(model_path=model_path, max_total_tokens=3000, log_level="warning",
                kv_compression="chelsea", chelsea_chunk_size=32, chelsea_keep_ratio=0.25,
                chelsea_sink_tokens=4, chelsea_min_similarity=-1.0, chunked_prefill_size=-1)
    args.update(kw)
    return Engine(**args)


def test_budget_covering_everything_equals_the_full_cache(tiny_llama_dir: str) -> None:
    """Prefill chunks and decode steps recall every centroid's members (the budget covers
    them all), so every query attends to the raw tokens: the full cache's attention."""
    ids = random_ids(200, 0)
    full = Engine(model_path=tiny_llama_dir, max_total_tokens=3000, log_level="warning")
    want = full.generate(input_ids=ids, sampling_params=GREEDY, return_logprob=True)
    full.shutdown()
    merged = _engine(tiny_llama_dir, chunked_prefill_size=64)
    merged_only = merged.generate(input_ids=ids, sampling_params=GREEDY, return_logprob=True)
    merged.shutdown()
    engine = _engine(tiny_llama_dir, chelsea_recall_budget=100000, chunked_prefill_size=64)
    got = engine.generate(input_ids=ids, sampling_params=GREEDY, return_logprob=True)
    kv = engine.get_server_info()["kv_cache"]
    assert kv["clustered_chunks"] == (200 + 40 - 1) // 32  # prompt and decode chunks
    assert kv["host_slots"] == kv["clustered_tokens"]  # every merged chunk is recallable
    assert got["output_ids"] == want["output_ids"]
    lp = [x for x, _, _ in got["meta_info"]["output_token_logprobs"]]
    ref = [x for x, _, _ in want["meta_info"]["output_token_logprobs"]]
    assert lp == pytest.approx(ref, abs=1e-5)
    # Merging alone does change the outputs' logprobs (the recall is what restores them).
    lp_m = [x for x, _, _ in merged_only["meta_info"]["output_token_logprobs"]]
    assert max(abs(a - b) for a, b in zip(lp_m[1:], ref[1:])) > 1e-4
    # Host slots go back with the device slots they belong to.
    assert engine.flush_cache()
    assert engine.get_server_info()["kv_cache"]["host_slots"] == 0
    engine.shutdown()


def test_radix_hit_reuses_recall_entries(tiny_llama_dir: str) -> None:
    # No raw recent chunk: the first request's prefix is compressed exactly as the hit sees it.
    engine = _engine(tiny_llama_dir, chelsea_recall_budget=16, chunked_prefill_size=64,
                     chelsea_recent_chunks=0)
    prefix = random_ids(160, 1)
    a = engine.generate(input_ids=prefix + random_ids(8, 2), sampling_params=GREEDY)
    host_after_first = engine.get_server_info()["kv_cache"]["host_slots"]
    b = engine.generate(input_ids=prefix + random_ids(8, 2), sampling_params=GREEDY)
    assert b["meta_info"]["cached_tokens"] >= 128
    assert a["output_ids"] == b["output_ids"]
    # The hit added no host copies for the shared chunks (only the new ones, if any).
    assert engine.get_server_info()["kv_cache"]["host_slots"] <= host_after_first + 2 * 32
    engine.shutdown()


def test_recall_keeps_passkey_at_keep_0_2(default_model_path: str) -> None:
    engine = Engine(model_path=default_model_path, max_total_tokens=5000, log_level="warning",
                    kv_compression="chelsea", chelsea_keep_ratio=0.2,
                    chelsea_recall_budget=256)
    params = {"temperature": 0, "max_new_tokens": 8}
    for key, depth in [(71432, 0.3), (50918, 0.7)]:
        prompt = passkey_prompt(engine.tokenizer, key, 2000, depth)
        assert str(key) in engine.generate(prompt, sampling_params=params)["text"]
    engine.shutdown()


@pytest.mark.parametrize("slot_args", [{"chelsea_representative": "medoid"},
                                       {"chelsea_size_bias": False},
                                       {}])
def test_a_recalled_centroid_brings_all_its_members_within_the_budget(
        tiny_llama_dir: str, monkeypatch: pytest.MonkeyPatch, slot_args: dict) -> None:
    """The budget counts member tokens, whatever weight the pool gives a slot (1 for a
    medoid or without the size bias): every centroid masked for a query head has all its
    members recalled for that head, and no head recalls more than the budget."""
    import torch

    from sglang_chelsea.compression import chelsea_recall

    budget, checked = 24, []
    select = chelsea_recall.RecallSelector.select

    def checked_select(self, layer_id, i, q, n_slots):
        sel = select(self, layer_id, i, q, n_slots)
        if sel is not None:
            index = self.indexes[i]
            n_q = q.shape[1]
            kv_head = torch.arange(n_q) // (n_q // self.store.pool.num_kv_heads)
            member = index.member[layer_id - self.first_layer][kv_head]  # [Hq, T]
            live = sel.log_weight[:, index.cent_pos] > float("-inf")
            # Padding centroids: no member maps to them (counted here, not read from the index).
            dead = torch.zeros(live.shape).scatter_add_(1, member, torch.ones(member.shape)) == 0
            masked = ~live & ~dead  # centroids replaced by their members
            want = masked.gather(1, member).sum(1)
            got = (sel.host_log_weight == 0).sum(1)
            assert torch.equal(got, want) and int(got.max()) <= budget
            checked.append(int(got.sum()))
        return sel

    monkeypatch.setattr(chelsea_recall.RecallSelector, "select", checked_select)
    engine = _engine(tiny_llama_dir, chelsea_recall_budget=budget, chunked_prefill_size=64,
                     **slot_args)
    try:
        engine.generate(input_ids=random_ids(200, 1), sampling_params=GREEDY)
    finally:
        engine.shutdown()
    assert checked and sum(checked) > 0


def test_recall_512_keeps_needles_that_keep_0_1_alone_loses(default_model_path: str) -> None:
    """The README's setting for a quarter of the device memory (keep 0.1, 5 raw chunks,
    recall 512), with the question prefilled over the compressed prompt: needles before its
    raw window are answered, and the same cache without recall loses them."""
    cases = [(47856, 0.1), (75471, 0.3)]

    def answers(recall: int) -> list[bool]:
        engine = Engine(model_path=default_model_path, max_total_tokens=4000,
                        log_level="warning", kv_compression="chelsea", chelsea_keep_ratio=0.1,
                        chelsea_recent_chunks=5, chelsea_recall_budget=recall,
                        chunked_prefill_size=128)
        try:
            params = {"temperature": 0, "max_new_tokens": 8}
            return [str(key) in engine.generate(
                        passkey_prompt(engine.tokenizer, key, 2048, depth), params)["text"]
                    for key, depth in cases]
        finally:
            engine.shutdown()

    assert answers(512) == [True, True]
    assert answers(0) == [False, False]
