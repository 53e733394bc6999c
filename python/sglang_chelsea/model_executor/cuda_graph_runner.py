"""CudaGraphRunner: decode steps replayed from CUDA graphs (SGLang's name and flags).

A decode step of a large model launches about a thousand small kernels; on a GPU their
launch cost, not the weights or the KV cache, sets the step time at short contexts. The
runner captures the whole decode forward (model and attention) once per padded batch size
into static input buffers; a step copies its token ids, positions and output slots into
them, lets the attention backend put its flattened slot lists into its own graph buffers
(SGLang's ``init_cuda_graph_state`` / ``init_forward_metadata_capture_cuda_graph`` /
``init_forward_metadata_replay_cuda_graph``; Triton and FlashInfer implement them) and
replays the graph.

What stays fixed in a graph: the batch size (a step runs in the smallest captured size
that holds it; the extra rows attend to nothing, write to the padding slot 0 and are
dropped), the decode split count (chosen for the longest context) and whether slot
weights are applied (decided once by the KV policy). The slot list buffer holds the whole
pool, so any mix of lengths fits. A decode step with a slot selector (clusterkv, chelsea
recall) is never replayed: its per-head lists depend on the step's queries, so it runs
eagerly.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from sglang_chelsea.model_executor.forward_batch_info import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from sglang_chelsea.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def capture_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to ``max_bs`` (which is always included)."""
    sizes = [b for b in (1, 2, 4) if b < max_bs] + list(range(8, max_bs, 8))
    return sizes + [max_bs]


class CudaGraphRunner:
    """Captures and replays decode forwards on a CUDA device (Triton or FlashInfer backend)."""

    def __init__(self, model_runner: "ModelRunner", max_bs: int) -> None:
        self.model_runner = model_runner
        self.max_bs = max_bs
        self.batch_sizes = capture_batch_sizes(max_bs)
        dev = model_runner.device
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.out_cache_loc = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        model_runner.attn_backend.init_cuda_graph_state(max_bs, model_runner.token_to_kv_pool,
                                                        model_runner.context_len)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.mempool = torch.cuda.graph_pool_handle()
        t0 = time.perf_counter()
        for bs in reversed(self.batch_sizes):  # largest first: smaller ones reuse its memory
            self._capture(bs)
        logger.info("captured CUDA graphs for decode batch sizes %s in %.1f s",
                    self.batch_sizes, time.perf_counter() - t0)

    def _batch(self, bs: int) -> ForwardBatch:
        mr = self.model_runner
        pool = mr.token_to_kv_pool
        fb = ForwardBatch(
            forward_mode=ForwardMode.DECODE, batch_size=bs, input_ids=self.input_ids[:bs],
            positions=self.positions[:bs], out_cache_loc=self.out_cache_loc[:bs],
            req_pool_indices=[0] * bs, seq_lens=[1] * bs, extend_prefix_lens=[0] * bs,
            extend_seq_lens=[1] * bs, req_to_token_pool=mr.req_to_token_pool,
            token_to_kv_pool=pool, attn_backend=mr.attn_backend)
        fb.attn_metadata = mr.attn_backend.init_forward_metadata_capture_cuda_graph(bs)
        return fb

    def _run(self, fb: ForwardBatch) -> torch.Tensor:
        model = self.model_runner.model
        return model.compute_logits(model(fb))

    @torch.inference_mode()
    def _capture(self, bs: int) -> None:
        fb = self._batch(bs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: compiles the kernels, settles the allocator
                self._run(fb)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            self.logits[bs] = self._run(fb)
        self.graphs[bs] = graph

    def can_run(self, forward_batch: ForwardBatch) -> bool:
        """A decode batch that fits, without a slot selection: a selecting KV policy's lists
        (ClusterKV, Chelsea recall) depend on each step's queries, so those steps run
        eagerly (the graphs hold the plain per-request lists only)."""
        return (forward_batch.forward_mode.is_decode() and forward_batch.batch_size <= self.max_bs
                and forward_batch.slot_selector is None)

    def replay(self, forward_batch: ForwardBatch) -> torch.Tensor:
        """Logits ``[B, V]`` of a decode batch (index tensors on the CPU)."""
        bs = forward_batch.batch_size
        padded = next(b for b in self.batch_sizes if b >= bs)
        self.input_ids[:bs].copy_(forward_batch.input_ids, non_blocking=True)
        self.positions[:bs].copy_(forward_batch.positions, non_blocking=True)
        self.out_cache_loc[:bs].copy_(forward_batch.out_cache_loc, non_blocking=True)
        if padded > bs:  # extra rows: token 0 written to (and read from) the padding slot
            self.input_ids[bs:padded].zero_()
            self.positions[bs:padded].zero_()
            self.out_cache_loc[bs:padded].zero_()
        self.model_runner.attn_backend.init_forward_metadata_replay_cuda_graph(
            forward_batch, padded)
        self.graphs[padded].replay()
        logits = self.logits[padded][:bs]
        rows = forward_batch.logits_rows
        return (logits if rows is None else logits[rows.to(logits.device)]).clone()
