"""ServerArgs: every launch flag, with SGLang's names where SGLang has the concept."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

from sglang_chelsea.entrypoints.reasoning import REASONING_PARSERS, check_reasoning_parser
from sglang_chelsea.entrypoints.tool_calls import TOOL_CALL_PARSERS

_FIELD_TYPES: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}
KV_COMPRESSION_CHOICES = ("none", "chelsea", "clusterkv", "snapkv", "streaming")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
ATTENTION_BACKEND_CHOICES = ("auto", "torch", "triton", "flashinfer")
LOAD_FORMAT_CHOICES = ("auto", "dummy")


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU (imported lazily: ServerArgs stays cheap to import)."""
    import torch

    return torch.cuda.is_available()


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


@dataclass
class ServerArgs:
    """Arguments shared by ``launch_server`` and the offline ``Engine``.

    Field names are the snake_case form of the command-line flags
    (``--max-total-tokens`` -> ``max_total_tokens``).
    """

    # Model and tokenizer
    model_path: Optional[str] = None
    tokenizer_path: Optional[str] = None
    served_model_name: Optional[str] = None
    chat_template: Optional[str] = None
    tool_call_parser: Optional[str] = None
    reasoning_parser: Optional[str] = None
    dtype: str = "auto"
    device: str = "auto"
    context_length: Optional[int] = None
    load_format: str = "auto"
    trust_remote_code: bool = False
    skip_tokenizer_init: bool = False

    # HTTP server
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: Optional[str] = None
    log_level: str = "info"
    log_requests: bool = False

    # Memory and scheduling
    mem_fraction_static: float = 0.2
    max_total_tokens: Optional[int] = None
    max_running_requests: int = 64
    max_prefill_tokens: int = 8192
    chunked_prefill_size: int = 2048
    page_size: int = 1
    schedule_policy: str = "fcfs"
    disable_radix_cache: bool = False
    attention_backend: str = "auto"
    disable_cpu_malloc_tuning: bool = False
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: Optional[int] = None
    random_seed: int = 0
    num_threads: Optional[int] = None
    tp_size: int = 1
    dp_size: int = 1

    # KV cache compression (this project's own)
    kv_compression: str = "none"
    chelsea_chunk_size: int = 128
    chelsea_keep_ratio: float = 0.5
    chelsea_round_fraction: float = 0.125
    chelsea_min_similarity: float = 0.0
    chelsea_sink_tokens: int = 4
    chelsea_full_layers: int = 0
    chelsea_size_bias: bool = True
    chelsea_query_weighting: bool = False
    chelsea_representative: str = "mean"
    chelsea_recent_chunks: int = 1
    chelsea_kernel: str = "torch"
    chelsea_recall_budget: int = 0
    hicache_ratio: float = 4.0
    streaming_window: int = 1024
    clusterkv_budget: int = 2048
    clusterkv_window: int = 512
    clusterkv_tokens_per_cluster: int = 32
    clusterkv_sink_tokens: int = 16
    clusterkv_full_layers: int = 2
    clusterkv_kmeans_iters: int = 10
    clusterkv_kernel: str = "torch"
    snapkv_budget: int = 1024
    snapkv_window: int = 32
    snapkv_kernel_size: int = 7
    kv_offload: bool = False

    def __post_init__(self) -> None:
        self.check()
        self._resolve_auto()
        if self.kv_compression in ("streaming", "snapkv"):
            # What is evicted depends on later tokens: the rest cannot be shared by prefix.
            self.disable_radix_cache = True

    def check(self) -> None:
        """Raise ValueError naming the first invalid argument."""
        self._check_types()
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "half", "float"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.device not in DEVICE_CHOICES:
            raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {self.device!r}")
        if self.device == "cuda" and not cuda_available():
            raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU; "
                             "use --device cpu")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {sorted(TOOL_CALL_PARSERS)}, "
                             f"got {self.tool_call_parser!r}")
        check_reasoning_parser(self.reasoning_parser)
        if self.load_format not in LOAD_FORMAT_CHOICES:
            raise ValueError(
                f"load_format must be one of {LOAD_FORMAT_CHOICES}, got {self.load_format!r}")
        if self.page_size < 1:
            raise ValueError("page_size must be >= 1")
        if self.max_total_tokens is not None and self.max_total_tokens < 2:
            raise ValueError("max_total_tokens must be >= 2")
        if not 0.0 < self.mem_fraction_static <= 1.0:
            raise ValueError("mem_fraction_static must be in (0, 1]")
        if self.max_running_requests < 1:
            raise ValueError("max_running_requests must be >= 1")
        if self.chunked_prefill_size is not None and self.chunked_prefill_size != -1 \
                and self.chunked_prefill_size < 1:
            raise ValueError("chunked_prefill_size must be >= 1 (or -1 to disable)")
        if self.max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be >= 1")
        if self.schedule_policy not in ("fcfs", "lpm"):
            raise ValueError(f"schedule_policy must be fcfs or lpm, got {self.schedule_policy!r}")
        if self.kv_compression not in KV_COMPRESSION_CHOICES:
            raise ValueError(
                f"kv_compression must be one of {KV_COMPRESSION_CHOICES}, got {self.kv_compression!r}")
        if self.chelsea_chunk_size < 2:
            raise ValueError("chelsea_chunk_size must be >= 2")
        if not 0.0 < self.chelsea_keep_ratio <= 1.0:
            raise ValueError("chelsea_keep_ratio must be in (0, 1]")
        if not 0.0 < self.chelsea_round_fraction <= 0.5:
            raise ValueError("chelsea_round_fraction must be in (0, 0.5]")
        if not -1.0 <= self.chelsea_min_similarity <= 1.0:
            raise ValueError("chelsea_min_similarity must be in [-1, 1]")
        if min(self.chelsea_sink_tokens, self.chelsea_full_layers, self.chelsea_recent_chunks) < 0:
            raise ValueError(
                "chelsea_sink_tokens, chelsea_full_layers and chelsea_recent_chunks must be >= 0")
        if self.chelsea_recall_budget < 0 or self.hicache_ratio <= 0:
            raise ValueError("chelsea_recall_budget must be >= 0 and hicache_ratio > 0")
        if self.chelsea_kernel not in ("torch", "triton"):
            raise ValueError(f"chelsea_kernel must be torch or triton, got {self.chelsea_kernel!r}")
        if self.chelsea_representative not in ("mean", "medoid"):
            raise ValueError("chelsea_representative must be mean or medoid, got "
                             f"{self.chelsea_representative!r}")
        if self.chelsea_representative == "medoid" and self.chelsea_query_weighting:
            raise ValueError("--chelsea-query-weighting weights a mean: it does not apply to "
                             "--chelsea-representative medoid (use one or the other)")
        if self.clusterkv_kernel not in ("torch", "triton"):
            raise ValueError(
                f"clusterkv_kernel must be torch or triton, got {self.clusterkv_kernel!r}")
        if self.streaming_window < 1:
            raise ValueError("streaming_window must be >= 1")
        if self.kv_compression != "none" and self.page_size not in (1, self.effective_page_size):
            source = ("--clusterkv-window" if self.kv_offload else "--chelsea-chunk-size")
            raise ValueError(
                f"with --kv-compression {self.kv_compression} the radix page is the policy's "
                f"chunk ({source}, {self.effective_page_size} tokens); --page-size "
                f"{self.page_size} conflicts with it: leave --page-size out or set {source}")
        if self.kv_compression == "clusterkv":
            self._check_clusterkv()
        self._check_snapkv()
        if self.kv_offload and self.kv_compression != "clusterkv":
            raise ValueError("--kv-offload needs --kv-compression clusterkv (chelsea recall "
                             f"has its own host tier), got {self.kv_compression!r}")
        if self.tp_size < 1 or self.dp_size < 1:
            raise ValueError("tp_size and dp_size must be >= 1")
        if self.dp_size > 1 and self.api_key:
            raise ValueError("--api-key with --dp-size > 1 is not supported: start the workers "
                             "and sglang-router separately (docs/scale-out.md)")
        if self.attention_backend not in ATTENTION_BACKEND_CHOICES:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKEND_CHOICES}, "
                             f"got {self.attention_backend!r}")
        if self.cuda_graph_max_bs is not None and self.cuda_graph_max_bs < 1:
            raise ValueError("cuda_graph_max_bs must be >= 1")

    def _check_flashinfer(self) -> None:
        """FlashInfer's kernels run on a GPU, in float16 / bfloat16, over one slot list per
        request (no per-head selections)."""
        if self.device != "cuda":
            raise ValueError("attention_backend 'flashinfer' needs --device cuda "
                             f"(got {self.device!r}); use torch on the CPU")
        if self.dtype in ("float32", "float"):
            raise ValueError("attention_backend 'flashinfer' runs float16 or bfloat16 only; "
                             "use --dtype bfloat16 (the GPU default) or --attention-backend "
                             "triton for float32")
        if self.selects_slots:
            raise ValueError(f"--kv-compression {self.kv_compression} selects slots per query "
                             "head, which the flashinfer backend does not run; use "
                             "--attention-backend triton")

    def _check_clusterkv(self) -> None:
        page = self.effective_page_size
        if self.clusterkv_window < page or self.clusterkv_window % page:
            raise ValueError(f"clusterkv_window must be a multiple of the page size ({page}: "
                             f"--chelsea-chunk-size), got {self.clusterkv_window}")
        if not 0 <= self.clusterkv_sink_tokens < self.clusterkv_window:
            raise ValueError("clusterkv_sink_tokens must be in [0, clusterkv_window)")
        if min(self.clusterkv_budget, self.clusterkv_tokens_per_cluster,
               self.clusterkv_kmeans_iters) < 1 or self.clusterkv_full_layers < 0:
            raise ValueError("clusterkv_budget, clusterkv_tokens_per_cluster and "
                             "clusterkv_kmeans_iters must be >= 1, clusterkv_full_layers >= 0")

    def _check_snapkv(self) -> None:
        if self.snapkv_budget < 1:
            raise ValueError(f"snapkv_budget must be >= 1, got {self.snapkv_budget}")
        if self.snapkv_window < 1:
            raise ValueError(f"snapkv_window must be >= 1, got {self.snapkv_window}")
        if self.snapkv_kernel_size < 1 or self.snapkv_kernel_size % 2 == 0:
            raise ValueError("snapkv_kernel_size must be odd and >= 1 (a centred pooling "
                             f"window), got {self.snapkv_kernel_size}")
        if self.kv_compression == "snapkv" and self.tp_size > 1:
            raise ValueError("snapkv does not support --tp-size > 1 yet (the observation "
                             "queries are captured on rank 0 only)")

    def _resolve_auto(self) -> None:
        """Pick the device (cuda when a GPU is present), its dtype and attention backend."""
        if self.device == "auto":
            self.device = "cuda" if cuda_available() else "cpu"
        if self.tp_size > 1 and self.device == "cuda" and self.tp_size > cuda_device_count():
            raise ValueError(f"tp_size {self.tp_size} needs one GPU per rank; torch sees "
                             f"{cuda_device_count()}")
        if self.attention_backend == "auto":
            self.attention_backend = "triton" if self.device == "cuda" else "torch"
        if self.attention_backend == "triton" and self.device == "cpu" \
                and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("attention_backend 'triton' needs --device cuda "
                             "(or TRITON_INTERPRET=1 to run its kernels on the CPU, slowly)")
        if self.attention_backend == "flashinfer":
            self._check_flashinfer()
        if self.kv_compression == "clusterkv" and self.clusterkv_kernel == "triton" \
                and self.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("clusterkv_kernel 'triton' needs --device cuda "
                             "(or TRITON_INTERPRET=1 to run its kernels on the CPU, slowly)")
        if self.selects_slots and self.tp_size > 1:
            raise ValueError("clusterkv and chelsea recall do not support --tp-size > 1 yet")

    @property
    def selects_slots(self) -> bool:
        """Whether the KV policy picks, per decode step and query head, which slots are
        attended (clusterkv, chelsea recall): data-dependent lists, so no CUDA graph."""
        return self.kv_compression == "clusterkv" or (
            self.kv_compression == "chelsea" and self.chelsea_recall_budget > 0)

    @property
    def uses_host_tier(self) -> bool:
        """Whether the KV policy keeps raw K/V in the host tier (``--hicache-ratio`` x the
        device pool): chelsea recall and ``--kv-offload``."""
        return self.kv_offload or (self.kv_compression == "chelsea"
                                   and self.chelsea_recall_budget > 0)

    @property
    def effective_page_size(self) -> int:
        """Radix page size: with a KV policy on, a page is a compression chunk; with
        ``--kv-offload``, a ClusterKV window (the unit that moves to the host tier)."""
        if self.kv_offload:
            return self.clusterkv_window
        if self.kv_compression != "none":
            return self.chelsea_chunk_size
        return self.page_size

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Register every field as a ``--flag`` with its help text."""
        d = ServerArgs
        p = parser
        g = p.add_argument_group("model")
        g.add_argument("--model-path", type=str, default=d.model_path,
                       help="HF model directory or .gguf file; default: the embedded "
                            "SmolLM2-135M-Instruct GGUF")
        g.add_argument("--tokenizer-path", type=str, default=d.tokenizer_path,
                       help="Tokenizer directory (default: the model path)")
        g.add_argument("--served-model-name", type=str, default=d.served_model_name,
                       help="Model name reported by /v1/models (default: the model path)")
        g.add_argument("--chat-template", type=str, default=d.chat_template,
                       help="Jinja chat template file or string, or 'chatml' (default: the tokenizer's)")
        g.add_argument("--tool-call-parser", type=str, default=d.tool_call_parser,
                       choices=sorted(TOOL_CALL_PARSERS),
                       help="How the model writes tool calls, to return them as tool_calls "
                            "in /v1/chat/completions (default: none; tool_choice required or "
                            "named works without one)")
        g.add_argument("--reasoning-parser", type=str, default=d.reasoning_parser,
                       choices=sorted(REASONING_PARSERS),
                       help="Return a reasoning model's <think> part as reasoning_content in "
                            "/v1/chat/completions (default: none)")
        g.add_argument("--dtype", type=str, default=d.dtype,
                       choices=["auto", "float32", "bfloat16", "float16", "half", "float"],
                       help="Weight and activation dtype; auto = float32 on the CPU, "
                            "bfloat16 on a GPU")
        g.add_argument("--device", type=str, default=d.device, choices=list(DEVICE_CHOICES),
                       help="auto (cuda when a GPU is present), cpu or cuda")
        g.add_argument("--context-length", type=int, default=d.context_length,
                       help="Override the model's maximum context length")
        g.add_argument("--load-format", type=str, default=d.load_format,
                       choices=list(LOAD_FORMAT_CHOICES),
                       help="auto (read the weights) or dummy (random weights of the "
                            "config's shape, for benchmarks)")
        g.add_argument("--trust-remote-code", action="store_true", help="Accepted for compatibility")
        g.add_argument("--skip-tokenizer-init", action="store_true",
                       help="Load no tokenizer in the model runner (offline benchmarks on input ids)")
        g = p.add_argument_group("http server")
        g.add_argument("--host", type=str, default=d.host, help="Bind address (default 127.0.0.1)")
        g.add_argument("--port", type=int, default=d.port, help="HTTP port (default 30000)")
        g.add_argument("--api-key", type=str, default=d.api_key,
                       help="Require 'Authorization: Bearer KEY' on every endpoint except /health")
        g.add_argument("--log-level", type=str, default=d.log_level, help="debug, info, warning, error")
        g.add_argument("--log-requests", action="store_true", help="Log every request's inputs and outputs")
        g = p.add_argument_group("memory and scheduling")
        g.add_argument("--mem-fraction-static", type=float, default=d.mem_fraction_static,
                       help="Fraction of available memory for the KV pool when --max-total-tokens is unset")
        g.add_argument("--max-total-tokens", type=int, default=d.max_total_tokens,
                       help="Number of KV slots in the pool (overrides --mem-fraction-static)")
        g.add_argument("--max-running-requests", type=int, default=d.max_running_requests,
                       help="Most requests decoding at once")
        g.add_argument("--max-prefill-tokens", type=int, default=d.max_prefill_tokens,
                       help="Most new tokens in one prefill batch")
        g.add_argument("--chunked-prefill-size", type=int, default=d.chunked_prefill_size,
                       help="Longest prefill chunk of one request per step; -1 disables chunking")
        g.add_argument("--page-size", type=int, default=d.page_size,
                       help="Radix cache page size in tokens (Chelsea uses its chunk size)")
        g.add_argument("--schedule-policy", type=str, default=d.schedule_policy, choices=["fcfs", "lpm"],
                       help="fcfs (first come first served) or lpm (longest prefix match first)")
        g.add_argument("--disable-radix-cache", action="store_true", help="Disable prefix caching")
        g.add_argument("--attention-backend", type=str, default=d.attention_backend,
                       choices=list(ATTENTION_BACKEND_CHOICES),
                       help="auto (triton on a GPU, torch on the CPU), torch, triton, or "
                       "flashinfer (GPU, float16/bfloat16; needs flashinfer-python)")
        g.add_argument("--disable-cpu-malloc-tuning", action="store_true",
                       help="On the CPU, let glibc return freed large blocks to the system "
                       "(by default they stay in the heap: fewer page faults, peak RSS kept; "
                       "Chelsea then also runs one prefill step's clustering at start, on "
                       "stand-in data, so the first long request finds that memory ready)")
        g.add_argument("--disable-cuda-graph", action="store_true",
                       help="Run decode eagerly on a GPU instead of replaying CUDA graphs")
        g.add_argument("--cuda-graph-max-bs", type=int, default=d.cuda_graph_max_bs,
                       help="Largest decode batch captured in a CUDA graph "
                            "(default: --max-running-requests, at most 64)")
        g.add_argument("--random-seed", type=int, default=d.random_seed, help="Global random seed")
        g.add_argument("--num-threads", type=int, default=d.num_threads,
                       help="torch intra-op threads (default: all cores)")
        g.add_argument("--tp-size", type=int, default=d.tp_size,
                       help="Tensor parallel ranks (one process each; gloo on the CPU, NCCL "
                            "on GPUs); each holds a share of the KV heads and MLP columns")
        g.add_argument("--dp-size", type=int, default=d.dp_size,
                       help="Data parallel workers: start this many servers on loopback and "
                            "sglang-router (cache_aware) in front of them on --host/--port")
        g = p.add_argument_group("kv cache compression")
        g.add_argument("--kv-compression", type=str, default=d.kv_compression,
                       choices=list(KV_COMPRESSION_CHOICES), help="KV cache compression policy")
        g.add_argument("--chelsea-chunk-size", type=int, default=d.chelsea_chunk_size,
                       help="Tokens per Chelsea chunk (= radix page when chelsea is on)")
        g.add_argument("--chelsea-keep-ratio", type=float, default=d.chelsea_keep_ratio,
                       help="Target fraction of a chunk's slots kept after merging")
        g.add_argument("--chelsea-round-fraction", type=float, default=d.chelsea_round_fraction,
                       help="Largest share of a chunk's current slots merged per round")
        g.add_argument("--chelsea-min-similarity", type=float, default=d.chelsea_min_similarity,
                       help="Key pairs less cosine-similar than this never merge")
        g.add_argument("--chelsea-sink-tokens", type=int, default=d.chelsea_sink_tokens,
                       help="First tokens of the sequence kept raw (attention sinks)")
        g.add_argument("--chelsea-full-layers", type=int, default=d.chelsea_full_layers,
                       help="First layers kept uncompressed")
        g.add_argument("--chelsea-size-bias", action=argparse.BooleanOptionalAction,
                       default=d.chelsea_size_bias,
                       help="Add log(cluster size) to each centroid's attention logit")
        g.add_argument("--chelsea-query-weighting", action=argparse.BooleanOptionalAction,
                       default=d.chelsea_query_weighting,
                       help="Weight each cluster member's K/V in its centroid by the attention "
                            "the model's mean query (measured once at start) gives it, instead "
                            "of by its size alone (KL -9..-14%% at keep 0.25-0.5, +7%% at keep "
                            "0.1, passkey at 8k worse: docs/benchmarks.md)")
        g.add_argument("--chelsea-representative", type=str, default=d.chelsea_representative,
                       choices=["mean", "medoid"],
                       help="What a cluster's slot holds: the size-weighted mean of its "
                            "members (with the log(size) bias), or its medoid, the member the "
                            "model's mean query attends most, kept raw with weight 1 (lower "
                            "KL with a long raw window, weaker passkey: docs/benchmarks.md)")
        g.add_argument("--chelsea-recent-chunks", type=int, default=d.chelsea_recent_chunks,
                       help="Newest completed chunks kept raw (compressed once newer ones complete)")
        g.add_argument("--chelsea-kernel", type=str, default=d.chelsea_kernel,
                       choices=["torch", "triton"],
                       help="Chunked Soft Matching implementation: the batched torch ops "
                            "(CPU or GPU) or the Triton kernel (GPU)")
        g.add_argument("--chelsea-recall-budget", type=int, default=d.chelsea_recall_budget,
                       help="chelsea: raw tokens per query head recalled from the host tier "
                            "in place of the best-scoring centroids at each decode step "
                            "(0: off)")
        g.add_argument("--hicache-ratio", type=float, default=d.hicache_ratio,
                       help="Host KV tier size as a multiple of the device pool (chelsea "
                            "recall, --kv-offload)")
        g.add_argument("--clusterkv-budget", type=int, default=d.clusterkv_budget,
                       help="clusterkv: clustered tokens each query head attends to per step")
        g.add_argument("--clusterkv-window", type=int, default=d.clusterkv_window,
                       help="clusterkv: tokens clustered together (whole pages); the "
                            "unclustered tail is always attended")
        g.add_argument("--clusterkv-tokens-per-cluster", type=int,
                       default=d.clusterkv_tokens_per_cluster,
                       help="clusterkv: about one k-means cluster per this many tokens")
        g.add_argument("--clusterkv-sink-tokens", type=int, default=d.clusterkv_sink_tokens,
                       help="clusterkv: first tokens always attended, never clustered")
        g.add_argument("--clusterkv-full-layers", type=int, default=d.clusterkv_full_layers,
                       help="clusterkv: first layers attending to every token")
        g.add_argument("--clusterkv-kmeans-iters", type=int, default=d.clusterkv_kmeans_iters,
                       help="clusterkv: k-means iterations")
        g.add_argument("--clusterkv-kernel", type=str, default=d.clusterkv_kernel,
                       choices=["torch", "triton"],
                       help="clusterkv: k-means and cluster selection as torch ops (CPU or "
                            "GPU) or as Triton kernels (GPU; CPU only with TRITON_INTERPRET=1)")
        g.add_argument("--kv-offload", action="store_true", default=d.kv_offload,
                       help="clusterkv: move each clustered window's raw K/V to the host tier "
                            "(--hicache-ratio); the device keeps the sinks, the unclustered "
                            "tail, the cluster index and per request the rows it attends to")
        g.add_argument("--streaming-window", type=int, default=d.streaming_window,
                       help="streaming: recent tokens kept besides the sinks")
        g.add_argument("--snapkv-budget", type=int, default=d.snapkv_budget,
                       help="snapkv: prompt tokens kept per layer and KV head at the end of "
                            "prefill, besides the observation window")
        g.add_argument("--snapkv-window", type=int, default=d.snapkv_window,
                       help="snapkv: last prompt tokens whose queries score the rest (kept raw)")
        g.add_argument("--snapkv-kernel-size", type=int, default=d.snapkv_kernel_size,
                       help="snapkv: max-pooling width smoothing the scores along positions "
                            "(odd)")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "ServerArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    def _check_types(self) -> None:
        """Each field holds its declared type (``Engine(...)`` keywords are not parsed like
        flags): ValueError naming the field otherwise. An int is accepted as a float."""
        for f in dataclasses.fields(self):
            declared = str(f.type)
            optional = declared.startswith("Optional[")
            name = declared[len("Optional["):-1] if optional else declared
            kind = _FIELD_TYPES.get(name)
            value = getattr(self, f.name)
            if kind is None or (optional and value is None):
                continue
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise ValueError(f"{f.name} must be {'None or ' if optional else ''}"
                                 f"{'a' if name != 'int' else 'an'} {name}, got {value!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "ServerArgs":
        """Build from keyword arguments, rejecting unknown names with a clear error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown ServerArgs field(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("api_key", None)
        return out


def prepare_server_args(argv: Optional[list[str]] = None) -> ServerArgs:
    parser = argparse.ArgumentParser(
        prog="python -m sglang_chelsea.launch_server",
        description="Launch the sglang-chelsea HTTP server (SGLang native + OpenAI APIs).")
    ServerArgs.add_cli_args(parser)
    try:
        return ServerArgs.from_cli_args(parser.parse_args(argv))
    except ValueError as e:  # a bad value or combination of flags: argparse's usage error
        parser.error(str(e))
