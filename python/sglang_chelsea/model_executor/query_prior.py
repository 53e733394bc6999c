"""The model's query prior: its mean post-RoPE query per layer and KV head.

Chelsea weights each cluster member by the attention a typical query gives it
(``kernels/query_weighted_merge.py``). The typical query is measured once at start-up, by
one prefill pass over seeded random token ids: it is a property of the weights, not of
the text (on SmolLM2-135M a prior from random ids, from another text or from the chunk's
own queries gave the same gain; ``docs/benchmarks.md``). The ids are fixed, so every
rank, and every start of the server, gets the same prior, and a chunk clusters the same
way whenever it is compressed.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Optional

import torch

from sglang_chelsea.compression.base import QueryObserver
from sglang_chelsea.model_executor.forward_batch_info import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from sglang_chelsea.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

#: Tokens in the calibration pass, and the seed of their ids.
CALIBRATION_TOKENS = 512
CALIBRATION_SEED = 0


class QueryMeanObserver(QueryObserver):
    """Sums each layer's queries over tokens and over the query heads of each KV group."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int,
                 device: torch.device) -> None:
        self.num_kv_heads = num_kv_heads
        self.sums = torch.zeros(num_layers, num_kv_heads, head_dim, device=device)
        self.count = 0

    def observe(self, layer_id: int, q: torch.Tensor, scaling: float) -> None:
        t, heads, d = q.shape
        grouped = q.float().view(t, self.num_kv_heads, heads // self.num_kv_heads, d)
        self.sums[layer_id] += grouped.sum(dim=(0, 2))
        if layer_id == 0:
            self.count += t * (heads // self.num_kv_heads)

    def mean(self) -> torch.Tensor:
        """``[num_layers, num_kv_heads, head_dim]`` float32."""
        return self.sums / max(self.count, 1)


@torch.inference_mode()
def observed_prefill(runner: "ModelRunner", input_ids: torch.Tensor, observer: QueryObserver,
                     inspect: Optional[Callable[[torch.Tensor], None]] = None) -> None:
    """Prefill ``input_ids`` once through ``runner``'s model outside the scheduler, with
    ``observer`` seeing every layer's queries; ``inspect(slots)`` may read the K/V the pass
    wrote before its request row and KV slots are given back."""
    n = int(input_ids.numel())
    req_idx = runner.req_to_token_pool.alloc()
    slots = runner.token_to_kv_pool_allocator.alloc(n)
    if req_idx is None or slots is None:
        if req_idx is not None:
            runner.req_to_token_pool.free(req_idx)
        if slots is not None:
            runner.token_to_kv_pool_allocator.free(slots)
        raise RuntimeError(f"no KV memory free for a {n}-token observed prefill")
    try:
        runner.req_to_token_pool.req_to_token[req_idx, :n] = slots.to(torch.int32)
        batch = ForwardBatch(
            forward_mode=ForwardMode.EXTEND, batch_size=1, input_ids=input_ids,
            positions=torch.arange(n), out_cache_loc=slots, req_pool_indices=[req_idx],
            seq_lens=[n], extend_prefix_lens=[0], extend_seq_lens=[n],
            req_to_token_pool=runner.req_to_token_pool,
            token_to_kv_pool=runner.token_to_kv_pool, attn_backend=runner.attn_backend,
            query_observer=observer)
        runner._forward_hidden(batch)
        if inspect is not None:
            inspect(slots)
    finally:
        runner.token_to_kv_pool_allocator.free(slots)
        runner.req_to_token_pool.free(req_idx)


def measure_query_prior(runner: "ModelRunner", num_tokens: int = CALIBRATION_TOKENS,
                        seed: int = CALIBRATION_SEED) -> torch.Tensor:
    """Run one prefill of ``num_tokens`` seeded random ids through ``runner``'s model (on
    every tensor-parallel rank at once, as at start-up) and return this rank's query prior
    ``[num_layers, num_kv_heads, head_dim]``."""
    cfg = runner.model_config
    n = max(1, min(num_tokens, runner.context_len, runner.max_total_num_tokens))
    t0 = time.perf_counter()
    input_ids = torch.randint(0, cfg.vocab_size, (n,),
                              generator=torch.Generator().manual_seed(seed))
    observer = QueryMeanObserver(cfg.num_hidden_layers, runner.num_kv_heads, cfg.head_dim,
                                 runner.device)
    observed_prefill(runner, input_ids, observer)
    logger.info("Measured the query prior over %d tokens in %.2f s", n, time.perf_counter() - t0)
    return observer.mean()
