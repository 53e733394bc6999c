"""ModelRunner: loads the model, owns the KV pools, runs forward passes.

With tensor parallelism every rank has a ModelRunner over its shard of the model and a
KV pool of its own KV heads, with the same slot numbering. Rank 0's runner serves the
scheduler and broadcasts each operation that touches the pool (a forward pass, a Chelsea
clustering step) before running it; the other ranks run ``serve_tp_followers`` and repeat
each operation on their shard.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from sglang_chelsea.attention.base_backend import AttentionBackend
from sglang_chelsea.attention.torch_backend import TorchNativeAttnBackend
from sglang_chelsea.compression.base import create_compressor
from sglang_chelsea.configs.model_config import ModelConfig
from sglang_chelsea.distributed.parallel_state import get_tp_group, shard_range
from sglang_chelsea.mem_cache.host_pool import HostKVPool, host_kv_bytes_per_slot
from sglang_chelsea.mem_cache.memory_pool import (
    MHATokenToKVPool,
    ReqToTokenPool,
    TokenToKVPoolAllocator,
    kv_bytes_per_slot,
)
from sglang_chelsea.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang_chelsea.model_executor.query_prior import measure_query_prior
from sglang_chelsea.model_loader import load_model, resolve_dtype
from sglang_chelsea.models.llama import ARCHITECTURES
from sglang_chelsea.server_args import ServerArgs
from sglang_chelsea.utils.host_memory import retain_freed_host_memory

if TYPE_CHECKING:
    from sglang_chelsea.model_executor.cuda_graph_runner import CudaGraphRunner

logger = logging.getLogger(__name__)


def available_memory_bytes(device: str = "cpu") -> int:
    """Free GPU memory on cuda; MemAvailable from /proc/meminfo on the CPU."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def create_attn_backend(name: str) -> AttentionBackend:
    """The backend named by ``--attention-backend`` (already resolved from auto)."""
    if name == "torch":
        return TorchNativeAttnBackend()
    if name == "triton":
        from sglang_chelsea.attention.triton_backend import TritonAttnBackend

        return TritonAttnBackend()
    if name == "flashinfer":
        from sglang_chelsea.attention.flashinfer_backend import FlashInferAttnBackend

        return FlashInferAttnBackend()
    raise ValueError(f"unknown attention backend {name!r}")


def init_dummy_weights(model: torch.nn.Module, device: torch.device, seed: int) -> None:
    """Random weights of the model's shape, made on ``device`` (``--load-format dummy``).

    Linear and embedding weights ~ N(0, 0.02), norms 1, biases 0 (SGLang's dummy loader
    fills uniform noise; a normal with small std keeps activations finite over many layers).
    """
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name.endswith(".bias"):
            param.data.zero_()
        else:
            param.data.normal_(0.0, 0.02, generator=gen)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


@dataclass
class ForwardCommand:
    """What the other tensor-parallel ranks need to repeat rank 0's forward pass: the
    batch's index tensors (CPU) and the request rows of ``req_to_token`` it reads."""

    forward_mode: ForwardMode
    input_ids: torch.Tensor
    positions: torch.Tensor
    out_cache_loc: torch.Tensor
    req_pool_indices: list[int]
    seq_lens: list[int]
    extend_prefix_lens: list[int]
    extend_seq_lens: list[int]
    rows: torch.Tensor  # [batch, max(seq_lens)] int32: req_to_token[req_pool_indices]

    @classmethod
    def from_batch(cls, fb: ForwardBatch) -> "ForwardCommand":
        table = fb.req_to_token_pool.req_to_token
        rows = table[fb.req_pool_indices, : max(fb.seq_lens)]
        return cls(fb.forward_mode, fb.input_ids.cpu(), fb.positions.cpu(),
                   fb.out_cache_loc.cpu(), fb.req_pool_indices, fb.seq_lens,
                   fb.extend_prefix_lens, fb.extend_seq_lens, rows)

    def to_batch(self, runner: "ModelRunner") -> ForwardBatch:
        """The batch on this rank (writes the request rows into its ``req_to_token``)."""
        table = runner.req_to_token_pool.req_to_token
        table[self.req_pool_indices, : self.rows.shape[1]] = self.rows
        return ForwardBatch(
            forward_mode=self.forward_mode, batch_size=len(self.req_pool_indices),
            input_ids=self.input_ids, positions=self.positions, out_cache_loc=self.out_cache_loc,
            req_pool_indices=self.req_pool_indices, seq_lens=self.seq_lens,
            extend_prefix_lens=self.extend_prefix_lens, extend_seq_lens=self.extend_seq_lens,
            req_to_token_pool=runner.req_to_token_pool, token_to_kv_pool=runner.token_to_kv_pool,
            attn_backend=runner.attn_backend)


@dataclass
class ClusterCommand:
    """A Chelsea clustering step over completed chunks (see ``ModelRunner.cluster_chunks``)."""

    slots: torch.Tensor
    protected: torch.Tensor
    targets: torch.Tensor


class ModelRunner:
    """Model weights + KV pools + attention backend, on the CPU or a CUDA GPU (one
    tensor-parallel rank's shard of them when the process joined a TP group)."""

    def __init__(self, server_args: ServerArgs) -> None:
        self.server_args = server_args
        if server_args.num_threads:
            torch.set_num_threads(server_args.num_threads)
        # On the CPU, freed memory stays in the heap (False where glibc's mallopt is missing).
        self.retains_freed_memory = (server_args.device == "cpu"
                                     and not server_args.disable_cpu_malloc_tuning
                                     and retain_freed_host_memory())
        torch.manual_seed(server_args.random_seed)
        self.tp_group = get_tp_group()
        self.tp_rank = self.tp_group.rank if self.tp_group is not None else 0
        self.tp_size = self.tp_group.size if self.tp_group is not None else 1
        self.device = torch.device(server_args.device)
        if self.device.type == "cuda" and self.tp_group is not None:
            self.device = torch.device("cuda", self.tp_rank)
        self.dtype = resolve_dtype(server_args.dtype, server_args.device)
        t0 = time.perf_counter()
        loaded = load_model(server_args.model_path, self.dtype,
                            tokenizer_path=server_args.tokenizer_path,
                            context_length=server_args.context_length,
                            load_format=server_args.load_format,
                            skip_tokenizer_init=server_args.skip_tokenizer_init)
        self.model_path = loaded.model_path
        self.model_config: ModelConfig = loaded.config
        self.tokenizer = loaded.tokenizer
        cfg = self.model_config
        self.context_len = server_args.context_length or cfg.max_position_embeddings
        if cfg.architecture not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {cfg.architecture!r}; "
                             f"supported: {sorted(ARCHITECTURES)}")
        if cfg.num_key_value_heads < self.tp_size:
            raise ValueError(
                f"--tp-size {self.tp_size} is larger than the model's {cfg.num_key_value_heads} "
                f"KV heads: every rank needs at least one KV head")
        kv_start, kv_end = shard_range(cfg.num_key_value_heads, self.tp_rank, self.tp_size)
        self.num_kv_heads = kv_end - kv_start  # this rank's KV heads
        with torch.device("meta"):
            model = ARCHITECTURES[cfg.architecture](cfg, self.context_len + 1, self.dtype)
        model.to(self.dtype)
        if loaded.weights is None:
            init_dummy_weights(model, self.device, server_args.random_seed)
        else:
            model.load_weights(loaded.weights)
            model.to(self.device)
        model.rotary.to(self.device)
        del loaded
        self.model = model.eval()
        logger.info("Loaded %s (%s, %d layers) in %.1f s", self.model_path, cfg.architecture,
                    cfg.num_hidden_layers, time.perf_counter() - t0)
        self._init_memory_pool()
        # The KV policy decides once whether attention applies slot weights (before any
        # CUDA graph is captured with or without them).
        self.kv_compressor = create_compressor(server_args)
        self.host_pool: Optional[HostKVPool] = None
        if self.host_tier_size:
            cfg = self.model_config
            self.host_pool = HostKVPool(self.host_tier_size, cfg.num_hidden_layers,
                                        cfg.num_key_value_heads, cfg.head_dim, self.dtype)
        if self.kv_compressor is not None:
            self.kv_compressor.bind(self.token_to_kv_pool, self.token_to_kv_pool_allocator,
                                    self.host_pool)
        if self.kv_compressor is not None and self.retains_freed_memory:
            self._warm_up_compressor()
        self.token_to_kv_pool.uniform_weights = not (
            self.kv_compressor is not None and self.kv_compressor.writes_slot_weights)
        self.attn_backend = create_attn_backend(server_args.attention_backend)
        if self.host_pool is not None:
            self.attn_backend.host_pool = self.host_pool
        if self.kv_compressor is not None and self.kv_compressor.wants_query_prior:
            self.kv_compressor.set_query_prior(measure_query_prior(self))
        self.cuda_graph_runner: Optional["CudaGraphRunner"] = None
        if (self.device.type == "cuda" and server_args.attention_backend in ("triton",
                                                                              "flashinfer")
                and not server_args.disable_cuda_graph and self.tp_size == 1):
            from sglang_chelsea.model_executor.cuda_graph_runner import CudaGraphRunner

            max_bs = server_args.cuda_graph_max_bs or min(server_args.max_running_requests, 64)
            self.cuda_graph_runner = CudaGraphRunner(self, max_bs)
            if server_args.selects_slots:
                logger.info("--kv-compression %s selects slots per query head: decode steps "
                            "with a selection run eagerly, not from the CUDA graphs",
                            server_args.kv_compression)

    def _init_memory_pool(self) -> None:
        """Size and allocate the device KV pool; size the host tier (recall, offload).

        On the CPU both live in the same memory, so ``--mem-fraction-static`` covers the
        device pool and its ``--hicache-ratio`` host tier together; either way a host tier
        that does not fit in the host memory available is refused with a clear error
        rather than left to the kernel's OOM killer."""
        args, cfg = self.server_args, self.model_config
        per_slot = kv_bytes_per_slot(cfg.num_hidden_layers, self.num_kv_heads,
                                     cfg.head_dim, self.dtype)
        host_per_slot = host_kv_bytes_per_slot(cfg.num_hidden_layers, cfg.num_key_value_heads,
                                               cfg.head_dim, self.dtype)
        ratio = args.hicache_ratio if args.uses_host_tier else 0.0
        shared_memory = self.device.type == "cpu"
        if args.max_total_tokens is not None:
            size = args.max_total_tokens
        else:
            slot_cost = per_slot + (ratio * host_per_slot if shared_memory else 0.0)
            size = int(available_memory_bytes(args.device) * args.mem_fraction_static
                       // slot_cost)
            size = max(size, 16)
            if self.tp_group is not None:  # slot numbers are shared: the smallest pool wins
                size = int(self.tp_group.all_reduce_cpu(torch.tensor([size]), dist.ReduceOp.MIN))
        self.max_total_num_tokens = size
        self.host_tier_size = max(1, int(size * ratio)) if args.uses_host_tier else 0
        if self.host_tier_size:
            need = self.host_tier_size * host_per_slot + (size * per_slot if shared_memory else 0)
            have = available_memory_bytes("cpu")
            if need > have:
                raise ValueError(
                    f"the host KV tier (--hicache-ratio {args.hicache_ratio:g}: "
                    f"{self.host_tier_size} slots, {self.host_tier_size * host_per_slot / 2**30:.1f}"
                    f" GiB)" + (f" and the KV pool ({size * per_slot / 2**30:.1f} GiB)"
                                if shared_memory else "")
                    + f" need {need / 2**30:.1f} GiB of host memory, but {have / 2**30:.1f} GiB"
                    " is available: lower --hicache-ratio or --max-total-tokens")
        self.req_to_token_pool = ReqToTokenPool(args.max_running_requests + 1, self.context_len + 1)
        self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(size)
        self.token_to_kv_pool = MHATokenToKVPool(size, cfg.num_hidden_layers, self.num_kv_heads,
                                                 cfg.head_dim, self.dtype, device=self.device)
        logger.info("KV pool: %d slots, %.1f MB", size, size * per_slot / 2**20)
        if self.host_tier_size:
            logger.info("Host KV tier: %d slots, %.1f MB", self.host_tier_size,
                        self.host_tier_size * host_per_slot / 2**20)

    @torch.inference_mode()
    def forward(self, forward_batch: ForwardBatch) -> torch.Tensor:
        """Run the model; return float32 logits for ``forward_batch.logits_rows`` (on the
        model's device; the scheduler builds the batch's index tensors on the CPU and they
        are moved here). Decode batches replay a CUDA graph when one is captured.
        With tensor parallelism the other ranks are told to run the same pass first."""
        if self.cuda_graph_runner is not None and self.cuda_graph_runner.can_run(forward_batch):
            return self.cuda_graph_runner.replay(forward_batch)
        if self.tp_group is not None:
            self.tp_group.broadcast_object(ForwardCommand.from_batch(forward_batch))
        hidden = self._forward_hidden(forward_batch)
        rows: Optional[torch.Tensor] = forward_batch.logits_rows
        if rows is not None:
            hidden = hidden.index_select(0, rows)
        return self.model.compute_logits(hidden)

    def _forward_hidden(self, forward_batch: ForwardBatch) -> torch.Tensor:
        forward_batch.to(self.device)
        self.attn_backend.init_forward_metadata(forward_batch)
        return self.model(forward_batch)

    def _warm_up_compressor(self) -> None:
        """Run the KV policy's per-step work once on stand-in data the size of one prefill
        step's completed chunks, so that the heap (kept by ``retain_freed_host_memory``)
        already holds that memory when the first long request arrives."""
        args = self.server_args
        step = args.chunked_prefill_size
        if step is None or step < 1:  # chunked prefill off: a whole prompt in one step
            step = min(self.context_len, args.max_prefill_tokens)
        t0 = time.perf_counter()
        assert self.kv_compressor is not None
        self.kv_compressor.warm_up(self.token_to_kv_pool, max(1, step // args.chelsea_chunk_size))
        logger.info("Warmed up the KV policy's step in %.2f s", time.perf_counter() - t0)

    def cluster_chunks(self, slots: torch.Tensor, protected: torch.Tensor,
                       targets: torch.Tensor) -> torch.Tensor:
        """Run the Chelsea compressor over completed chunks (``slots`` ``[N, C]``, at most
        ``targets`` ``[N]`` slots kept each) on every rank's KV heads; returns the slots kept
        per chunk (the same on every rank)."""
        assert self.kv_compressor is not None
        if self.tp_group is not None:
            self.tp_group.broadcast_object(ClusterCommand(slots.cpu(), protected.cpu(),
                                                          targets.cpu()))
        return self.kv_compressor.cluster(self.token_to_kv_pool, slots, protected, targets)

    def serve_tp_followers(self) -> None:
        """Ranks other than 0: repeat rank 0's operations on this shard until it goes away
        (its process exits and the group's connection closes)."""
        assert self.tp_group is not None and not self.tp_group.is_first_rank
        while True:
            cmd = self.tp_group.broadcast_object()
            with torch.inference_mode():
                if isinstance(cmd, ForwardCommand):
                    self._forward_hidden(cmd.to_batch(self))
                elif isinstance(cmd, ClusterCommand):
                    assert self.kv_compressor is not None
                    self.kv_compressor.cluster(self.token_to_kv_pool, cmd.slots, cmd.protected,
                                               cmd.targets)
                else:
                    raise RuntimeError(f"unknown tensor-parallel command {type(cmd).__name__}")
