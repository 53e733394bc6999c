"""ModelRunner: loads the model, owns the KV pools, runs forward passes."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Optional

import torch

from sglang_chelsea.attention.base_backend import AttentionBackend
from sglang_chelsea.attention.torch_backend import TorchNativeAttnBackend
from sglang_chelsea.compression.base import create_compressor
from sglang_chelsea.configs.model_config import ModelConfig
from sglang_chelsea.mem_cache.host_pool import HostKVPool
from sglang_chelsea.mem_cache.memory_pool import (
    MHATokenToKVPool,
    ReqToTokenPool,
    TokenToKVPoolAllocator,
    kv_bytes_per_slot,
)
from sglang_chelsea.model_executor.forward_batch_info import ForwardBatch
from sglang_chelsea.model_loader import load_model, resolve_dtype
from sglang_chelsea.models.llama import ARCHITECTURES
from sglang_chelsea.server_args import ServerArgs

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


class ModelRunner:
    """Model weights + KV pools + attention backend, on the CPU or a CUDA GPU."""

    def __init__(self, server_args: ServerArgs) -> None:
        self.server_args = server_args
        if server_args.num_threads:
            torch.set_num_threads(server_args.num_threads)
        torch.manual_seed(server_args.random_seed)
        self.device = torch.device(server_args.device)
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
        if server_args.kv_compression == "chelsea" and server_args.chelsea_recall_budget > 0:
            cfg = self.model_config
            self.host_pool = HostKVPool(int(self.max_total_num_tokens * server_args.hicache_ratio),
                                        cfg.num_hidden_layers, cfg.num_key_value_heads,
                                        cfg.head_dim, self.dtype)
        if self.kv_compressor is not None:
            self.kv_compressor.bind(self.token_to_kv_pool, self.token_to_kv_pool_allocator,
                                    self.host_pool)
        self.token_to_kv_pool.uniform_weights = not (
            self.kv_compressor is not None and self.kv_compressor.writes_slot_weights)
        self.attn_backend = create_attn_backend(server_args.attention_backend)
        if self.host_pool is not None:
            self.attn_backend.host_pool = self.host_pool
        self.cuda_graph_runner: Optional["CudaGraphRunner"] = None
        if (self.device.type == "cuda" and server_args.attention_backend == "triton"
                and not server_args.disable_cuda_graph):
            from sglang_chelsea.model_executor.cuda_graph_runner import CudaGraphRunner

            max_bs = server_args.cuda_graph_max_bs or min(server_args.max_running_requests, 64)
            self.cuda_graph_runner = CudaGraphRunner(self, max_bs)

    def _init_memory_pool(self) -> None:
        args, cfg = self.server_args, self.model_config
        per_slot = kv_bytes_per_slot(cfg.num_hidden_layers, cfg.num_key_value_heads,
                                     cfg.head_dim, self.dtype)
        if args.max_total_tokens is not None:
            size = args.max_total_tokens
        else:
            size = int(available_memory_bytes(args.device) * args.mem_fraction_static) // per_slot
            size = max(size, 16)
        self.max_total_num_tokens = size
        self.req_to_token_pool = ReqToTokenPool(args.max_running_requests + 1, self.context_len + 1)
        self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(size)
        self.token_to_kv_pool = MHATokenToKVPool(size, cfg.num_hidden_layers,
                                                 cfg.num_key_value_heads, cfg.head_dim, self.dtype,
                                                 device=self.device)
        logger.info("KV pool: %d slots, %.1f MB", size, size * per_slot / 2**20)

    @torch.inference_mode()
    def forward(self, forward_batch: ForwardBatch) -> torch.Tensor:
        """Run the model; return float32 logits for ``forward_batch.logits_rows`` (on the
        model's device; the scheduler builds the batch's index tensors on the CPU and they
        are moved here). Decode batches replay a CUDA graph when one is captured."""
        if self.cuda_graph_runner is not None and self.cuda_graph_runner.can_run(forward_batch):
            return self.cuda_graph_runner.replay(forward_batch)
        forward_batch.to(self.device)
        self.attn_backend.init_forward_metadata(forward_batch)
        hidden = self.model(forward_batch)
        rows: Optional[torch.Tensor] = forward_batch.logits_rows
        if rows is not None:
            hidden = hidden.index_select(0, rows)
        return self.model.compute_logits(hidden)
