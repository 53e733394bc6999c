"""The FlashInfer backend (a JIT-compiled size-bias variant of FlashInfer's paged prefill
kernel) against a float32 reference of attention with ``log(weight)`` added per slot and
KV head, and against the Triton backend: extend over a cached prefix of centroid slots
(weights > 1, unused slots of weight 0) plus causal new tokens, and decode, batched.

The kernel tests need a CUDA GPU and flashinfer-python (they JIT-compile the variant with
nvcc on first use); the argument checks run everywhere.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from sglang_chelsea.server_args import ServerArgs

HAS_FLASHINFER_GPU = (torch.cuda.is_available()
                      and importlib.util.find_spec("flashinfer") is not None)
gpu_only = pytest.mark.skipif(not HAS_FLASHINFER_GPU,
                              reason="needs a CUDA GPU and flashinfer-python")


def test_flashinfer_backend_argument_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="needs --device cuda"):
        ServerArgs(attention_backend="flashinfer", device="cpu")
    # As on a GPU machine (the checks below read the arguments only).
    monkeypatch.setattr("sglang_chelsea.server_args.cuda_available", lambda: True)
    monkeypatch.setattr("sglang_chelsea.server_args.cuda_device_count", lambda: 1)
    with pytest.raises(ValueError, match="float16 or bfloat16 only"):
        ServerArgs(attention_backend="flashinfer", device="cuda", dtype="float32")
    with pytest.raises(ValueError, match="selects slots per query head"):
        ServerArgs(attention_backend="flashinfer", device="cuda", kv_compression="clusterkv")


def test_missing_flashinfer_is_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from sglang_chelsea.attention.flashinfer_backend import import_flashinfer

    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import flashinfer -> ImportError
    with pytest.raises(ImportError, match="pip install 'sglang-chelsea\\[gpu\\]'"):
        import_flashinfer()


def _case(decode: bool, dtype: torch.dtype, weighted: bool, seed: int = 0):
    """A pool with random K/V and (optionally) cluster-size weights, three requests with
    cached prefixes of scattered slots, and this pass's new tokens."""
    from sglang_chelsea.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang_chelsea.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    gen = torch.Generator().manual_seed(seed)
    kv_heads, q_heads, dim, layers = 2, 8, 128, 2
    prefix = [300, 37, 1000]
    new = [1, 1, 1] if decode else [50, 129, 7]
    size = sum(prefix) + sum(new) + 64
    pool = MHATokenToKVPool(size, layers, kv_heads, dim, dtype, device="cuda")
    for layer in range(layers):
        pool.k_buffer[layer].copy_(torch.randn(kv_heads, size + 1, dim, generator=gen))
        pool.v_buffer[layer].copy_(torch.randn(kv_heads, size + 1, dim, generator=gen))
        if weighted:
            w = torch.randint(0, 9, (kv_heads, size + 1), generator=gen).float()
            w[:, ::5] = 1.0  # every request keeps live slots in every head
            pool.weight_buffer[layer].copy_(w)
    pool.uniform_weights = not weighted
    req_pool = ReqToTokenPool(4, 2048)
    slots = torch.randperm(size, generator=gen)[: sum(prefix) + sum(new)] + 1
    locs, start = [], 0
    for i, (p, n) in enumerate(zip(prefix, new)):
        req_pool.req_to_token[i, : p + n] = slots[start:start + p + n].int()
        locs.append(slots[start + p:start + p + n])
        start += p + n
    t = sum(new)
    fb = ForwardBatch(
        forward_mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND, batch_size=3,
        input_ids=torch.zeros(t, dtype=torch.int64), positions=torch.zeros(t, dtype=torch.int64),
        out_cache_loc=torch.cat(locs).to("cuda"), req_pool_indices=[0, 1, 2],
        seq_lens=[p + n for p, n in zip(prefix, new)], extend_prefix_lens=prefix,
        extend_seq_lens=new, req_to_token_pool=req_pool, token_to_kv_pool=pool,
        attn_backend=None)
    q = torch.randn(t, q_heads, dim, generator=gen).to("cuda", dtype)
    k = torch.randn(t, kv_heads, dim, generator=gen).to("cuda", dtype)
    v = torch.randn(t, kv_heads, dim, generator=gen).to("cuda", dtype)
    return fb, q, k, v


def _reference(fb, q: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    """float32 softmax over each request's slots with log(weight) added, causal in extend
    (run after the backend wrote the new K/V into the pool)."""
    pool = fb.token_to_kv_pool
    group = q.shape[1] // pool.num_kv_heads
    out, start = [], 0
    for i, n_new in enumerate(fb.extend_seq_lens):
        n = fb.seq_lens[i]
        idx = fb.req_to_token_pool.req_to_token[i, :n].long().to("cuda")
        k = pool.k_buffer[layer][:, idx].float().repeat_interleave(group, 0)  # [H, n, D]
        v = pool.v_buffer[layer][:, idx].float().repeat_interleave(group, 0)
        w = pool.weight_buffer[layer][:, idx].repeat_interleave(group, 0)  # [H, n]
        qi = q[start:start + n_new].float().transpose(0, 1)  # [H, m, D]
        logits = qi @ k.transpose(1, 2) * scale + torch.log(w)[:, None, :]
        pos = torch.arange(n, device="cuda")
        visible = pos[None, :] <= (n - n_new + torch.arange(n_new, device="cuda"))[:, None]
        logits = logits.masked_fill(~visible, float("-inf"))
        out.append((logits.softmax(-1) @ v).transpose(0, 1))
        start += n_new
    return torch.cat(out)


@gpu_only
@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_flashinfer_backend_matches_reference(decode: bool, weighted: bool,
                                              dtype: torch.dtype) -> None:
    from sglang_chelsea.attention.flashinfer_backend import FlashInferAttnBackend
    from sglang_chelsea.attention.triton_backend import TritonAttnBackend

    scale = 1 / math.sqrt(128)
    results = {}
    for name, backend in (("flashinfer", FlashInferAttnBackend()), ("triton", TritonAttnBackend())):
        fb, q, k, v = _case(decode, dtype, weighted)
        fb.attn_backend = backend
        backend.init_forward_metadata(fb)
        outs = []
        for layer in range(2):  # one plan, reused by every layer
            run = backend.forward_decode if decode else backend.forward_extend
            outs.append(run(q, k, v, layer, fb, scale).float())
        ref = torch.stack([_reference(fb, q, layer, scale) for layer in range(2)])
        results[name] = (torch.stack(outs), ref)
    got, ref = results["flashinfer"]
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    triton_err = (results["triton"][0] - results["triton"][1]).abs().max().item()
    # bfloat16 / float16 inputs and outputs: rounding of the output alone is ~4e-3.
    assert err < 2e-2, (err, triton_err)
    assert err < 2 * triton_err + 5e-3, (err, triton_err)
    if weighted:  # the bias matters: the unweighted softmax is far from the reference
        fb, q, k, v = _case(decode, dtype, weighted)
        fb.token_to_kv_pool.uniform_weights = True
        backend = FlashInferAttnBackend()
        backend.init_forward_metadata(fb)
        run = backend.forward_decode if decode else backend.forward_extend
        plain = run(q, k, v, 0, fb, scale).float()
        assert (plain - ref[0]).abs().max().item() > 0.1


SMALL_LLAMA = str(Path(__file__).resolve().parents[2] / "benchmark" / "configs"
                  / "small-llama-hd128")


def _engine_outputs(backend: str, policy: dict, **kw) -> list[dict]:
    """Greedy outputs with logprobs of three prompts batched (a padded CUDA-graph batch of
    4), then a radix hit on the first prompt's prefix; random bfloat16 weights (seeded)."""
    from sglang_chelsea import Engine

    engine = Engine(model_path=SMALL_LLAMA, load_format="dummy", skip_tokenizer_init=True,
                    attention_backend=backend, dtype="bfloat16", max_total_tokens=4000,
                    chunked_prefill_size=64, log_level="warning", **policy, **kw)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 20000, (n,), generator=gen).tolist() for n in (150, 70, 97)]
    params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    try:
        outs = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
        outs.append(engine.generate(input_ids=prompts[0][:130] + prompts[1][:20],
                                    sampling_params=params, return_logprob=True))
        return outs
    finally:
        engine.shutdown()


def _logprobs(out: dict) -> list[float]:
    return [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]


@gpu_only
@pytest.mark.parametrize("policy", [
    {},
    {"kv_compression": "chelsea", "chelsea_chunk_size": 32, "chelsea_keep_ratio": 0.5},
], ids=["full", "chelsea"])
def test_flashinfer_engine_graphs_match_eager(policy: dict) -> None:
    graphs = _engine_outputs("flashinfer", policy)
    eager = _engine_outputs("flashinfer", policy, disable_cuda_graph=True)
    assert graphs[3]["meta_info"]["cached_tokens"] > 0
    for a, b in zip(graphs, eager):
        assert a["output_ids"] == b["output_ids"]
        assert max(abs(x - y) for x, y in zip(_logprobs(a), _logprobs(b))) < 1e-3


def test_failed_jit_build_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with flashinfer but no working nvcc: the first wrapper fails to build."""
    import types

    from sglang_chelsea.attention import flashinfer_backend
    from sglang_chelsea.mem_cache.memory_pool import MHATokenToKVPool

    def broken_wrapper(*args, **kwargs):
        raise RuntimeError("Ninja build failed\nnvcc: not found")

    fake = types.SimpleNamespace(BatchPrefillWithPagedKVCacheWrapper=broken_wrapper)
    monkeypatch.setattr(flashinfer_backend, "import_flashinfer", lambda: fake)
    backend = flashinfer_backend.FlashInferAttnBackend()
    pool = MHATokenToKVPool(8, 1, 2, 64, torch.bfloat16)
    with pytest.raises(RuntimeError, match="JIT-compiled with the CUDA toolkit.*Ninja build "
                                           "failed; use --attention-backend triton"):
        backend._new_wrapper(pool)
