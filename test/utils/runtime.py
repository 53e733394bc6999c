"""Helpers for runtime-core tests: direct model forwards, HF references, leak checks."""

from __future__ import annotations

import random
from typing import Any, Optional

import torch

from sglang_chelsea.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang_chelsea.model_executor.model_runner import ModelRunner


def prefill_logits(model_runner: ModelRunner, input_ids: list[int]) -> torch.Tensor:
    """Float32 logits ``[T, V]`` of a full prefill of one request, computed by our runner.

    Borrows a request row and ``T`` KV slots from the runner's pools (whatever the
    scheduler does not hold) and gives them back afterwards.
    """
    n = len(input_ids)
    pool = model_runner.req_to_token_pool
    allocator = model_runner.token_to_kv_pool_allocator
    row = pool.alloc()
    if row is None:
        raise RuntimeError("no free request row")
    slots: Optional[torch.Tensor] = None
    try:
        slots = allocator.alloc(n)
        if slots is None:
            raise RuntimeError(f"no {n} free KV slots")
        pool.req_to_token[row, :n] = slots.to(pool.req_to_token.dtype)
        batch = ForwardBatch(
            forward_mode=ForwardMode.EXTEND, batch_size=1,
            input_ids=torch.tensor(input_ids, dtype=torch.int64),
            positions=torch.arange(n, dtype=torch.int64),
            out_cache_loc=slots.to(torch.int64),
            req_pool_indices=[row], seq_lens=[n], extend_prefix_lens=[0], extend_seq_lens=[n],
            req_to_token_pool=pool, token_to_kv_pool=model_runner.token_to_kv_pool,
            attn_backend=model_runner.attn_backend,
            logits_rows=torch.arange(n, dtype=torch.int64))
        logits = model_runner.forward(batch)
        return logits[:, : model_runner.model_config.vocab_size].clone()
    finally:
        if slots is not None:
            allocator.free(slots)
        pool.free(row)


@torch.inference_mode()
def hf_logits(hf_model: Any, input_ids: list[int]) -> torch.Tensor:
    """Float32 logits ``[T, V]`` of a Hugging Face causal LM on one sequence."""
    out = hf_model(torch.tensor([input_ids], dtype=torch.int64))
    return out.logits[0].float()


@torch.inference_mode()
def hf_greedy(hf_model: Any, input_ids: list[int],
              max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """HF ``generate(do_sample=False)``: the new token ids and the raw logits of each step."""
    out = hf_model.generate(torch.tensor([input_ids], dtype=torch.int64), do_sample=False,
                            max_new_tokens=max_new_tokens, output_logits=True,
                            return_dict_in_generate=True, attention_mask=torch.ones(
                                1, len(input_ids), dtype=torch.int64),
                            pad_token_id=hf_model.config.eos_token_id)
    new_ids = out.sequences[0, len(input_ids):].tolist()
    return new_ids, torch.stack([step[0].float() for step in out.logits])


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|ours - ref| / max|ref|``."""
    return float((ours - ref).abs().max() / ref.abs().max())


def random_ids(n: int, seed: int, low: int = 100, high: int = 49000) -> list[int]:
    """``n`` reproducible random token ids in ``[low, high)``."""
    rng = random.Random(seed)
    return [rng.randrange(low, high) for _ in range(n)]


def assert_no_leak(engine: Any) -> None:
    """With nothing queued or running: every KV slot is free or held (unlocked) by the radix
    tree, no slot is free twice, and every request row is free. Then evicting the whole
    tree frees every slot."""
    sched = engine.scheduler
    assert not sched.has_work(), "requests still queued or running"
    tree, allocator, pool = sched.tree_cache, sched.allocator, sched.req_to_token_pool
    assert pool.available_size() == pool.size, "request rows leaked"
    assert sorted(pool.free_slots) == list(range(pool.size)), "request rows double-freed"
    assert tree.protected_size() == 0, "radix nodes still locked"
    assert allocator.available_size() + tree.total_size() == sched.max_total_num_tokens, \
        (allocator.available_size(), tree.total_size(), sched.max_total_num_tokens)
    tree.evict(tree.evictable_size())
    assert tree.total_size() == 0
    allocator._merge_released()
    free = allocator.free_slots.tolist()
    assert len(free) == len(set(free)), "a KV slot was freed twice"
    assert sorted(free) == list(range(1, sched.max_total_num_tokens + 1)), "KV slots leaked"
    info = engine.get_server_info()["kv_cache"]
    assert info["free_slots"] == info["total_slots"]
    assert engine.flush_cache()
    info = engine.get_server_info()["kv_cache"]
    assert info["free_slots"] == info["total_slots"] and info["logical_tokens"] == 0
