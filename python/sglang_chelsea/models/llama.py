"""Llama-family decoder (Llama 2/3, Mistral, SmolLM2) and Qwen2 (Llama + q/k/v bias).

Weights arrive with Hugging Face names; q/k/v and gate/up are fused at load time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglang_chelsea.configs.model_config import ModelConfig
from sglang_chelsea.layers.rotary_embedding import RotaryEmbedding, apply_rotary
from sglang_chelsea.model_executor.forward_batch_info import ForwardBatch


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim ** -0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        t = hidden.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        assert forward_batch.rope_cache is not None
        cos, sin = forward_batch.rope_cache
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        out = forward_batch.attn_backend.forward(q, k, v, self.layer_id, forward_batch, self.scaling)
        return self.o_proj(out.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), forward_batch)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaForCausalLM(nn.Module):
    """``forward`` returns the final hidden states; ``compute_logits`` the vocabulary logits."""

    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config, max_positions, dtype)
        self.requires_grad_(False)

    @torch.inference_mode()
    def forward(self, forward_batch: ForwardBatch) -> torch.Tensor:
        forward_batch.rope_cache = self.rotary.lookup(forward_batch.positions)
        hidden = self.embed_tokens(forward_batch.input_ids)
        for layer in self.layers:
            hidden = layer(hidden, forward_batch)
        return self.norm(hidden)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load HF-named weights, fusing q/k/v and gate/up."""
        params = dict(self.named_parameters())
        fused: dict[str, torch.Tensor] = {}
        for i in range(self.config.num_hidden_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            fused[f"layers.{i}.self_attn.qkv_proj.weight"] = torch.cat(
                [weights[attn + f"{n}_proj.weight"] for n in "qkv"])
            if self.config.attention_bias:
                fused[f"layers.{i}.self_attn.qkv_proj.bias"] = torch.cat(
                    [weights[attn + f"{n}_proj.bias"] for n in "qkv"])
            fused[f"layers.{i}.self_attn.o_proj.weight"] = weights[attn + "o_proj.weight"]
            fused[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat(
                [weights[mlp + "gate_proj.weight"], weights[mlp + "up_proj.weight"]])
            fused[f"layers.{i}.mlp.down_proj.weight"] = weights[mlp + "down_proj.weight"]
            for norm in ("input_layernorm", "post_attention_layernorm"):
                fused[f"layers.{i}.{norm}.weight"] = weights[p + norm + ".weight"]
        fused["embed_tokens.weight"] = weights["model.embed_tokens.weight"]
        fused["norm.weight"] = weights["model.norm.weight"]
        tied = self.config.tie_word_embeddings or "lm_head.weight" not in weights
        if not tied:
            fused["lm_head.weight"] = weights["lm_head.weight"]
        expected = set(params) - ({"lm_head.weight"} if tied else set())
        missing = expected - set(fused)
        if missing:
            raise ValueError(f"weights missing for parameters: {sorted(missing)[:5]}")
        for name, tensor in fused.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"shape mismatch for {name}: model {tuple(params[name].shape)}, "
                                 f"checkpoint {tuple(tensor.shape)}")
        dtype = self.embed_tokens.weight.dtype
        self.load_state_dict({k: t.to(dtype).contiguous() for k, t in fused.items()},
                             strict=False, assign=True)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight
        self.requires_grad_(False)


ARCHITECTURES = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM}
