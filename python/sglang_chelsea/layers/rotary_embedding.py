"""Rotary position embedding (HF's rotate-half convention), cos/sin by logical position."""

from __future__ import annotations

import torch

from sglang_chelsea.configs.model_config import ModelConfig


def compute_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling; scaled RoPE types come from transformers."""
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in (None, "default") and config.hf_config is not None:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unsupported rope type {rope_type!r}")
        inv_freq, attn_scaling = ROPE_INIT_FUNCTIONS[rope_type](config.hf_config, "cpu")
        return inv_freq.float(), float(attn_scaling)
    dim = config.head_dim
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    return 1.0 / (config.rope_theta ** exponent), 1.0


class RotaryEmbedding:
    """Precomputed cos/sin table over all positions of the context."""

    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype) -> None:
        inv_freq, attn_scaling = compute_inv_freq(config)
        # Explicit device: the model may be built under a meta-device context.
        t = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * attn_scaling).to(dtype)
        self.sin = (emb.sin() * attn_scaling).to(dtype)

    def to(self, device: torch.device) -> None:
        """Move the tables to the model's device."""
        self.cos = self.cos.to(device)
        self.sin = self.sin.to(device)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape ``[T, 1, head_dim]`` for broadcasting over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, heads, head_dim]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
