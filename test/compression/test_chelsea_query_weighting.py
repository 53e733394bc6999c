"""Chelsea's query-weighted centroids and medoids in the engine: the start-up query prior
equals the mean post-RoPE query HF transformers computes on the same ids, and the slots the
engine writes into the pool equal the reference matcher + query-weighted merge (or medoid
pick) applied to the raw keys a full-cache engine holds for the same chunk."""

from __future__ import annotations

import pytest
import torch

from sglang_chelsea import Engine
from sglang_chelsea.kernels.chunked_soft_matching import chunked_soft_matching
from sglang_chelsea.kernels.query_weighted_merge import query_medoids, query_weighted_centroids
from sglang_chelsea.model_executor.query_prior import CALIBRATION_SEED, CALIBRATION_TOKENS

C = 32
SINKS = 4


def _chelsea(model_path: str, **kw) -> Engine:
    args = dict(model_path=model_path, max_total_tokens=4000, log_level="warning",
                kv_compression="chelsea", chelsea_chunk_size=C, chelsea_keep_ratio=0.25,
                chelsea_sink_tokens=SINKS, chelsea_min_similarity=-1.0)
    args.update(kw)
    return Engine(**args)


def _hf_query_prior(model_dir: str, n: int) -> torch.Tensor:
    """Mean post-RoPE query per layer and KV head, from HF transformers' own modules."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    kv_heads, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    ids = torch.randint(0, cfg.vocab_size, (n,),
                        generator=torch.Generator().manual_seed(CALIBRATION_SEED))
    prior = torch.zeros(cfg.num_hidden_layers, kv_heads, d)

    def hook(layer: int, attn: torch.nn.Module):
        def pre(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            q = attn.q_proj(hidden).view(1, n, -1, d).transpose(1, 2)
            q, _ = apply_rotary_pos_emb(q, q, cos, sin)
            prior[layer] = q[0].reshape(kv_heads, -1, n, d).mean(dim=(1, 2))
        return pre

    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_pre_hook(hook(i, layer.self_attn), with_kwargs=True)
    with torch.no_grad():
        model(ids[None])
    return prior


def test_query_prior_equals_hf_mean_query_and_frees_its_slots(tiny_llama_dir: str) -> None:
    engine = _chelsea(tiny_llama_dir, chelsea_query_weighting=True)
    try:
        prior = engine.scheduler.kv_compressor.query_prior
        assert prior is not None
        expected = _hf_query_prior(tiny_llama_dir, CALIBRATION_TOKENS)
        assert prior.shape == expected.shape
        assert torch.allclose(prior, expected, atol=1e-5)
        kv = engine.get_server_info()["kv_cache"]
        assert kv["free_slots"] == kv["total_slots"]
        pool = engine.scheduler.req_to_token_pool
        assert pool.available_size() == pool.size
    finally:
        engine.shutdown()
    off = _chelsea(tiny_llama_dir)  # off by default
    try:
        assert off.scheduler.kv_compressor.query_prior is None
    finally:
        off.shutdown()


def _chunk_kv(engine: Engine, ids: list[int], page: int
              ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: the K, V ``[H, n, D]`` and weights ``[H, n]`` of the cached slots of chunk
    ``page`` (a radix page of Chelsea's engine; C one-token pages of the full cache's)."""
    match = engine.scheduler.tree_cache.match_prefix(ids)
    lens = match.page_lens if engine.scheduler.kv_compressor is not None else [C] * (page + 1)
    start = sum(lens[:page])
    slots = match.value[start:start + lens[page]].to(torch.int64)
    pool = engine.scheduler.token_to_kv_pool
    return ([k[:, slots].clone() for k in pool.k_buffer],
            [v[:, slots].clone() for v in pool.v_buffer],
            [w[:, slots].clone() for w in pool.weight_buffer])


@pytest.mark.parametrize("mode", ["weighted", "mean", "medoid"])
def test_engine_centroids_equal_the_reference_merge(tiny_llama_dir: str, mode: str) -> None:
    ids = torch.randint(100, 40000, (3 * C + 5,),
                        generator=torch.Generator().manual_seed(3)).tolist()
    params = {"temperature": 0, "max_new_tokens": 1}
    full = Engine(model_path=tiny_llama_dir, max_total_tokens=4000, log_level="warning",
                  chunked_prefill_size=C)
    try:
        full.generate(input_ids=ids, sampling_params=params)
        raw = [_chunk_kv(full, ids, 0), _chunk_kv(full, ids, 1)]
    finally:
        full.shutdown()
    engine = _chelsea(tiny_llama_dir, chelsea_query_weighting=mode == "weighted",
                      chelsea_representative="medoid" if mode == "medoid" else "mean",
                      chunked_prefill_size=C)
    try:
        engine.generate(input_ids=ids, sampling_params=params)
        compressor = engine.scheduler.kv_compressor
        prior = compressor.query_prior
        for page in (0, 1):
            got_k, got_v, got_w = _chunk_kv(engine, ids, page)
            raw_k, raw_v, _ = raw[page]
            protected = torch.zeros(1, C, dtype=torch.bool)
            protected[0, :max(0, SINKS - page * C)] = True
            for layer, (k, v) in enumerate(zip(raw_k, raw_v)):
                ref = chunked_soft_matching(k[None], v[None], target=compressor.chunk_target(page),
                                            round_fraction=0.125, min_similarity=-1.0,
                                            protected=protected)
                ref_k, ref_v, ref_w = ref.keys[0], ref.values[0], ref.sizes[0]
                args = (k, v, ref.assignment[0], ref_k.shape[1], prior[layer] if prior is not None
                        else None)
                if mode == "weighted":
                    ref_k, ref_v = query_weighted_centroids(*args, k.shape[-1] ** -0.5)
                if mode == "medoid":
                    ref_k, ref_v = query_medoids(*args)
                    ref_w = (ref_w > 0).float()  # a medoid weighs 1, not its cluster's size
                    # Every medoid is one of the chunk's raw rows, unchanged.
                    for head in range(k.shape[0]):
                        used = ref.sizes[0][head] > 0
                        rows = got_k[layer][head, :ref_k.shape[1]][used]
                        assert (rows[:, None] == k[head][None]).all(-1).any(-1).all()
                m = ref_k.shape[1]
                assert torch.equal(got_w[layer][:, :m], ref_w)
                assert torch.allclose(got_k[layer][:, :m], ref_k, atol=1e-5)
                assert torch.allclose(got_v[layer][:, :m], ref_v, atol=1e-5)
    finally:
        engine.shutdown()


def test_observed_prefill_without_a_request_row_gives_back_its_slots(tiny_llama_dir: str) -> None:
    from sglang_chelsea.model_executor.query_prior import QueryMeanObserver, observed_prefill

    engine = _chelsea(tiny_llama_dir)
    try:
        runner = engine.scheduler.model_runner
        rows = runner.req_to_token_pool
        taken = [rows.alloc() for _ in range(rows.available_size())]
        free_before = runner.token_to_kv_pool_allocator.available_size()
        pool = runner.token_to_kv_pool
        observer = QueryMeanObserver(pool.num_layers, pool.num_kv_heads, pool.head_dim,
                                     runner.device)
        with pytest.raises(RuntimeError, match="no KV memory free"):
            observed_prefill(runner, torch.arange(16), observer)
        assert runner.token_to_kv_pool_allocator.available_size() == free_before
        for idx in taken:
            rows.free(idx)
    finally:
        engine.shutdown()
