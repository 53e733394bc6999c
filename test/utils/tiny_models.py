"""Tiny random-weight Hugging Face checkpoints (Llama, Qwen2, Qwen3) with the SmolLM2 tokenizer.

They load in well under a second, so loader and model tests can compare the runtime's
outputs against ``transformers`` exactly. Norm weights and biases are randomised too
(HF initialises them to ones and zeros), so a mixed-up norm or a dropped bias shows.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from sglang_chelsea.model_loader import default_model_path, load_tokenizer

_ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
# Llama is untied and Qwen2 tied by default, so both lm_head paths are exercised.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"tie_word_embeddings": False},
    "qwen2": {"tie_word_embeddings": True},
    # q/k norms, and a head_dim that is not hidden_size / heads (16), as in Qwen3 checkpoints
    "qwen3": {"tie_word_embeddings": True, "head_dim": 32},
}
_COMMON: dict[str, Any] = {
    "vocab_size": 49152,  # the SmolLM2 tokenizer's
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}


def _randomise_norms_and_biases(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give norm weights values around 1 and biases non-zero values."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def make_tiny_hf_model(out_dir: str, arch: str = "llama", seed: int = 0, **overrides: Any) -> str:
    """Save a random fp32 ``arch`` model (safetensors) and the SmolLM2 tokenizer in ``out_dir``.

    ``overrides`` replace config fields (e.g. ``num_hidden_layers=3``,
    ``tie_word_embeddings=True``). Returns ``out_dir``.
    """
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {sorted(_ARCHS)}, not {arch!r}")
    config_cls, model_cls = _ARCHS[arch]
    config = config_cls(**{**_COMMON, **_DEFAULTS[arch], **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    _randomise_norms_and_biases(model, torch.Generator().manual_seed(seed + 1))
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(default_model_path()).save_pretrained(out_dir)
    return out_dir
