"""The FlashInfer attention backend: FlashInfer's paged prefill kernel with a custom
attention variant that adds each slot's ``log(size)`` to its logits.

FlashInfer's stock paged kernels cannot carry Chelsea's size bias exactly: a custom mask
only allows or blocks a key, ALiBi and the soft-cap are positional or global, and
repeating a centroid's slot ``size`` times would need a different index list per KV head
(sizes differ per head) and read the centroid that many times. So the backend JIT-compiles
a variant of FlashInfer's FA2 batch-prefill kernel (``flashinfer.jit``'s customisation
API): its ``LogitsTransform`` reads, for the logit of (request ``b``, key ``j``, KV head
``h``), the slot ``s = kv_indices[kv_indptr[b] + j]`` (pages of one slot) and adds
``log(weight[h, s])`` from the pool's per-layer slot-weight tensor, passed to the kernel
as an extra tensor. Weight 0 gives ``-inf``: an unused centroid slot is masked, as in the
torch and Triton backends. With uniform weights (no compression, or policies that never
merge) a scalar switches the lookup off.

One ``BatchPrefillWithPagedKVCacheWrapper`` serves extend (causal over the request's
cached slots followed by its new ones, all read from the pool after the new K/V are
written) and decode (one query per request). It is planned once per forward pass, in
``init_forward_metadata``, and the plan is reused by every layer. The pool's
``[kv_heads, slots, head_dim]`` buffers are handed over as FlashInfer's ``HND`` layout with
page size 1 (a strided view, no copy).

Not supported here (clear errors at start-up, ``ServerArgs``): float32 (FlashInfer's
kernels take float16 / bfloat16), and policies that select slots per query head
(clusterkv, chelsea recall): use the Triton backend for those. Decode steps replay CUDA
graphs as on the Triton backend (``--disable-cuda-graph`` runs them eagerly).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from sglang_chelsea.attention.base_backend import AttentionBackend
from sglang_chelsea.attention.slot_lists import flatten_slot_lists, indptr_of
from sglang_chelsea.mem_cache.memory_pool import MHATokenToKVPool
from sglang_chelsea.model_executor.forward_batch_info import ForwardBatch

logger = logging.getLogger(__name__)

VARIANT_NAME = "ChelseaSizeBias"

# A FlashInfer attention variant (AttentionVariantBase, variant_helper.cuh). The logits it
# receives are raw q.k; like FlashInfer's ALiBi variant it applies sm_scale itself and sets
# sm_scale_log2 = log2(e), so the bias is added in natural-log units.
VARIANT_DECL = r"""
DEFINE_HAS_MEMBER(paged_kv)

struct ChelseaSizeBias : AttentionVariantBase {
  static constexpr bool use_softmax = true;
  uint32_t qo_len, kv_len, window_left;
  float sm_scale_log2;
  const int32_t* slots;

  template <typename Params>
  __device__ __host__ ChelseaSizeBias(const Params& params, uint32_t batch_idx,
                                      uint8_t* smem_ptr) {
    qo_len = params.get_qo_len(batch_idx);
    kv_len = params.get_kv_len(batch_idx);
    window_left = kv_len;
    sm_scale_log2 = math::log2e;
    if constexpr (has_paged_kv_v<Params>) {
      slots = params.paged_kv.indices + params.paged_kv.indptr[batch_idx];
    } else {
      slots = nullptr;
    }
  }

  REGISTER_LOGITS_TRANSFORM(params, logits, batch_idx, qo_idx, kv_idx, qo_head_idx,
                            kv_head_idx, {
    float out = logits * float(params.sm_scale);
    if constexpr (has_paged_kv_v<Params>) {
      if (params.use_weight) {
        const float w = params.slot_weight[int64_t(kv_head_idx) * params.weight_stride +
                                           slots[kv_idx]];
        out += logf(w);
      }
    }
    return out;
  })
};
"""

TENSOR_NAMES = ["slot_weight"]
TENSOR_DTYPES = ["float"]
SCALAR_NAMES = ["weight_stride", "use_weight", "sm_scale"]
SCALAR_DTYPES = ["int64_t", "int64_t", "double"]
WORKSPACE_BYTES = 256 * 2**20


def import_flashinfer() -> Any:
    """``flashinfer``, or a clear ImportError saying how to get it."""
    try:
        import flashinfer
    except ImportError as exc:
        raise ImportError("--attention-backend flashinfer needs the flashinfer-python package "
                          "(pip install 'sglang-chelsea[gpu]' or pip install "
                          "flashinfer-python); it JIT-compiles its kernels with nvcc on "
                          "first use") from exc
    return flashinfer


def jit_args(dtype: torch.dtype, head_dim: int) -> list[Any]:
    """``jit_args`` of the size-bias variant for one KV dtype and head size (the JIT cache
    key is the URI, so each combination compiles once per machine)."""
    uri = f"sglang_chelsea_size_bias_{str(dtype).split('.')[-1]}_hd{head_dim}_v1"
    return [uri, dtype, dtype, dtype, torch.int32, head_dim, head_dim, TENSOR_NAMES,
            TENSOR_DTYPES, SCALAR_NAMES, SCALAR_DTYPES, VARIANT_NAME, VARIANT_DECL]


@dataclass
class FlashInferMetadata:
    """This pass's wrapper and its plan arguments (qo_indptr, kv_indptr, kv_indices,
    last_page_len). The first layer plans it (the number of query heads is known from its
    ``q``); the others reuse the plan."""

    wrapper: Any
    plan_args: tuple
    causal: bool
    planned: bool = False


def _plan_args(kv_indptr: torch.Tensor, kv_indices: torch.Tensor, extend_lens: list[int]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``plan()``'s lists for page size 1: qo_indptr, kv_indptr, kv_indices and the last
    page lengths (all 1)."""
    return (indptr_of(extend_lens), kv_indptr, kv_indices.to(torch.int32),
            torch.ones(len(extend_lens), dtype=torch.int32))


class FlashInferAttnBackend(AttentionBackend):
    """Paged attention with the per-slot size bias in a FlashInfer custom variant (GPU).

    Decode runs from CUDA graphs (``CudaGraphRunner``) through one CUDA-graph wrapper per
    captured batch size: its index buffers are static, and each replay re-plans it with the
    step's lists (on the host, outside the graph), as FlashInfer's graph mode expects.
    """

    def __init__(self) -> None:
        self._flashinfer = import_flashinfer()
        self._wrapper: Any = None
        self._workspace: torch.Tensor | None = None
        self._graph_wrappers: dict[int, Any] = {}
        self._graph_indices: torch.Tensor | None = None
        self._num_q_heads = 0
        self.host_pool = None  # the model runner sets it for recall policies (refused here)

    def _new_wrapper(self, pool: MHATokenToKVPool, **graph_buffers: torch.Tensor) -> Any:
        """A wrapper running the size-bias variant for the pool's dtype and head size
        (nvcc compiles the variant the first time on a machine; later loads are cached).
        Wrappers share one workspace: their passes never overlap."""
        k0 = pool.k_buffer[0]
        if k0.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"the flashinfer backend needs float16 or bfloat16, got {k0.dtype}")
        first = self._workspace is None
        t0 = time.perf_counter()
        if first:
            logger.info("FlashInfer: loading the size-bias attention variant for %s, head dim "
                        "%d (nvcc compiles it on the first run on a machine; minutes)",
                        k0.dtype, pool.head_dim)
            self._workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=k0.device)
        try:
            wrapper = self._flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                self._workspace, kv_layout="HND", backend="fa2",
                use_cuda_graph=bool(graph_buffers), jit_args=jit_args(k0.dtype, pool.head_dim),
                jit_kwargs={"paged_kv_stride_mode": "equal"}, **graph_buffers)
        except (RuntimeError, OSError, ValueError) as exc:
            first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise RuntimeError(
                "FlashInfer could not build or load its size-bias attention variant (it is "
                "JIT-compiled with the CUDA toolkit's nvcc and ninja on first use, and needs "
                f"flashinfer-python 0.7.x): {first_line}; use --attention-backend triton "
                "instead") from exc
        if first:
            logger.info("FlashInfer: variant ready in %.1f s", time.perf_counter() - t0)
        return wrapper

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        pool = forward_batch.token_to_kv_pool
        if self._wrapper is None:
            self._wrapper = self._new_wrapper(pool)
        kv_indptr, kv_indices = flatten_slot_lists(forward_batch.req_to_token_pool.req_to_token,
                                                   forward_batch.req_pool_indices,
                                                   list(forward_batch.seq_lens))
        forward_batch.attn_metadata = FlashInferMetadata(
            self._wrapper, _plan_args(kv_indptr, kv_indices.to(pool.k_buffer[0].device),
                                      forward_batch.extend_seq_lens),
            causal=not forward_batch.forward_mode.is_decode())

    def init_cuda_graph_state(self, max_bs: int, pool: MHATokenToKVPool,
                              max_context_len: int) -> None:
        # One index buffer shared by the graph wrappers (one graph replays at a time): the
        # whole pool plus a padding slot per row.
        self._graph_indices = torch.zeros(pool.size + max_bs + 1, dtype=torch.int32,
                                          device=pool.k_buffer[0].device)
        self._graph_pool = pool

    def init_forward_metadata_capture_cuda_graph(self, bs: int) -> FlashInferMetadata:
        dev = self._graph_pool.k_buffer[0].device
        if self._wrapper is None:  # compiles / loads the variant before any graph
            self._wrapper = self._new_wrapper(self._graph_pool)
        wrapper = self._new_wrapper(
            self._graph_pool,
            qo_indptr_buf=torch.arange(bs + 1, dtype=torch.int32, device=dev),
            paged_kv_indptr_buf=torch.arange(bs + 1, dtype=torch.int32, device=dev),
            paged_kv_indices_buf=self._graph_indices,
            paged_kv_last_page_len_buf=torch.ones(bs, dtype=torch.int32, device=dev))
        self._graph_wrappers[bs] = wrapper
        # Capture-time lists: each request attends to the padding slot 0 only.
        ones = [1] * bs
        return FlashInferMetadata(wrapper, _plan_args(indptr_of(ones), torch.zeros(bs), ones),
                                  causal=False)

    def init_forward_metadata_replay_cuda_graph(self, forward_batch: ForwardBatch,
                                                padded_bs: int) -> None:
        # Rows past the batch list the padding slot 0 once (FlashInfer takes no empty list).
        pad = padded_bs - forward_batch.batch_size
        _, kv_indices = flatten_slot_lists(forward_batch.req_to_token_pool.req_to_token,
                                           forward_batch.req_pool_indices,
                                           list(forward_batch.seq_lens))
        args = _plan_args(indptr_of(list(forward_batch.seq_lens) + [1] * pad),
                          torch.cat([kv_indices, torch.zeros(pad, dtype=kv_indices.dtype)]),
                          [1] * padded_bs)
        pool = self._graph_pool
        self._graph_wrappers[padded_bs].plan(
            *args, self._num_q_heads, pool.num_kv_heads, pool.head_dim, 1, causal=False,
            q_data_type=pool.dtype, kv_data_type=pool.dtype)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                forward_batch: ForwardBatch, scaling: float) -> torch.Tensor:
        if forward_batch.slot_selector is not None:
            raise ValueError("the flashinfer backend does not run per-head slot selections "
                             "(clusterkv, chelsea recall); use --attention-backend triton")
        pool = forward_batch.token_to_kv_pool
        pool.set_kv_buffer(layer_id, forward_batch.out_cache_loc, k, v)
        # [kv_heads, slots, D] as HND pages of one slot: [slots, kv_heads, 1, D], no copy.
        k_cache = pool.k_buffer[layer_id].transpose(0, 1).unsqueeze(2)
        v_cache = pool.v_buffer[layer_id].transpose(0, 1).unsqueeze(2)
        weight = pool.weight_buffer[layer_id]
        meta: FlashInferMetadata = forward_batch.attn_metadata
        if not meta.planned:
            self._num_q_heads = q.shape[1]
            meta.wrapper.plan(*meta.plan_args, q.shape[1], pool.num_kv_heads, pool.head_dim, 1,
                              causal=meta.causal, q_data_type=q.dtype, kv_data_type=k_cache.dtype)
            meta.planned = True
        return meta.wrapper.run(q.contiguous(), (k_cache, v_cache), weight, weight.stride(0),
                                int(not pool.uniform_weights), float(scaling))

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                       forward_batch: ForwardBatch, scaling: float) -> torch.Tensor:
        return self._attend(q, k, v, layer_id, forward_batch, scaling)

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                       forward_batch: ForwardBatch, scaling: float) -> torch.Tensor:
        return self._attend(q, k, v, layer_id, forward_batch, scaling)
