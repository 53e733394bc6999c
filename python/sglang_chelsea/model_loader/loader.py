"""Entry points of the model loading layer: pick the format, load config, weights, tokenizer.

A model path is either a ``.gguf`` file, a directory holding ``config.json`` and
safetensors weights (Hugging Face layout), a directory holding exactly one ``.gguf`` file,
or None for the embedded default model (SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import glob
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
from transformers import AutoTokenizer

from sglang_chelsea.configs.model_config import ModelConfig
from sglang_chelsea.model_loader import gguf_loader, hf_loader
from sglang_chelsea.model_loader.default_model import default_model_path
from sglang_chelsea.model_loader.gguf_cache import cached_gguf_model_config
from sglang_chelsea.model_loader.gguf_tokenizer import load_gguf_tokenizer

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    """Everything the runtime needs from a checkpoint; ``weights`` use HF names and ``dtype``."""

    config: ModelConfig
    weights: Optional[dict[str, torch.Tensor]]  # None for --load-format dummy
    tokenizer: Any  # None with --skip-tokenizer-init
    model_path: str


def resolve_dtype(dtype: str, device: str = "cpu") -> torch.dtype:
    """Map a ``--dtype`` string to a torch dtype ("auto": float32 on the CPU, bfloat16 on a GPU)."""
    key = dtype.lower()
    if key == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    if key not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose auto or one of {', '.join(_DTYPES)}")
    return _DTYPES[key]


def resolve_model_path(model_path: Optional[str]) -> str:
    """Absolute path of the model (default model for None); a directory with one GGUF -> it."""
    if model_path is None:
        return default_model_path()
    path = os.path.abspath(os.path.expanduser(model_path))
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Model path {model_path!r} does not exist (only local paths are supported: "
            "a .gguf file or a Hugging Face checkpoint directory)"
        )
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = glob.glob(os.path.join(path, "*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise ValueError(
            f"{model_path!r} is neither a Hugging Face checkpoint (no config.json) "
            f"nor a directory with exactly one .gguf file (found {len(ggufs)})"
        )
    return path


def is_gguf(path: str) -> bool:
    """Whether ``path`` (already resolved) is a GGUF file."""
    return os.path.isfile(path) and path.endswith(".gguf")


def _check_file(path: str) -> None:
    """Reject a plain file that is not GGUF (e.g. a lone .bin or .safetensors)."""
    if os.path.isfile(path) and not is_gguf(path):
        raise ValueError(f"Model file {path!r} is not a .gguf file")


def _with_context_length(config: ModelConfig, context_length: Optional[int]) -> ModelConfig:
    """Apply a ``--context-length`` override."""
    if context_length is None:
        return config
    return replace(config, max_position_embeddings=int(context_length))


def expected_weight_names(config: ModelConfig) -> list[str]:
    """The HF parameter names a checkpoint of ``config`` must provide."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    projections = ["self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                   "mlp.down_proj.weight", "input_layernorm.weight",
                   "post_attention_layernorm.weight"]
    for p in ("q", "k", "v"):
        projections.append(f"self_attn.{p}_proj.weight")
        if config.attention_bias:
            projections.append(f"self_attn.{p}_proj.bias")
    if config.qk_norm:
        projections += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    for i in range(config.num_hidden_layers):
        names.extend(f"model.layers.{i}.{p}" for p in projections)
    return names


def _check_weights(config: ModelConfig, weights: dict[str, torch.Tensor], path: str) -> None:
    """Fail early, naming them, when parameters are missing."""
    missing = [n for n in expected_weight_names(config) if n not in weights]
    if missing:
        raise ValueError(f"{path}: {len(missing)} parameters missing, e.g. {missing[:5]}")


def load_model_config(model_path: Optional[str], context_length: Optional[int] = None
                      ) -> ModelConfig:
    """The ModelConfig of a model without reading its weights (cheap)."""
    path = resolve_model_path(model_path)
    _check_file(path)
    if is_gguf(path):
        config = cached_gguf_model_config(path)
    else:
        config = hf_loader.hf_model_config(path)
    return _with_context_length(config, context_length)


def load_tokenizer(model_path: Optional[str], tokenizer_path: Optional[str] = None) -> Any:
    """The model's tokenizer (``tokenizer_path`` overrides); GGUF tokenizers come from a cache."""
    path = resolve_model_path(tokenizer_path if tokenizer_path is not None else model_path)
    _check_file(path)
    if is_gguf(path):
        return load_gguf_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def load_model(
    model_path: Optional[str],
    dtype: torch.dtype,
    tokenizer_path: Optional[str] = None,
    context_length: Optional[int] = None,
    load_format: str = "auto",
    skip_tokenizer_init: bool = False,
) -> LoadedModel:
    """Load config, weights (cast to ``dtype``) and tokenizer of a GGUF file or HF directory.

    ``load_format="dummy"`` reads the config only (the runner fills random weights);
    ``skip_tokenizer_init`` leaves the tokenizer out.
    """
    path = resolve_model_path(model_path)
    _check_file(path)
    tokenizer = None if skip_tokenizer_init else load_tokenizer(path, tokenizer_path)
    if load_format == "dummy":
        config = load_model_config(path, context_length)
        return LoadedModel(config=config, weights=None, tokenizer=tokenizer, model_path=path)
    start = time.perf_counter()
    if is_gguf(path):
        reader = gguf_loader.open_gguf(path)
        config = gguf_loader.gguf_model_config(reader)
        weights = gguf_loader.load_gguf_weights(reader, config, dtype)
    else:
        config = hf_loader.hf_model_config(path)
        weights = hf_loader.load_hf_weights(path, config, dtype)
    _check_weights(config, weights, path)
    logger.info("loaded %s in %.1f s", path, time.perf_counter() - start)
    return LoadedModel(
        config=_with_context_length(config, context_length),
        weights=weights,
        tokenizer=tokenizer,
        model_path=path,
    )
