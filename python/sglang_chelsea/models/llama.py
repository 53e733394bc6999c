"""Llama-family decoder (Llama 2/3, Mistral, SmolLM2), Qwen2 (Llama + q/k/v bias) and Qwen3
(Llama + a per-head RMSNorm of q and k before the rotary embedding).

Weights arrive with Hugging Face names; q/k/v and gate/up are fused at load time. With
tensor parallelism each rank holds a contiguous range of KV heads (with their query heads)
and of the MLP's intermediate columns; embeddings, norms and the LM head stay replicated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglang_chelsea.configs.model_config import ModelConfig
from sglang_chelsea.distributed.parallel_state import get_tp_rank, get_tp_size, shard_range
from sglang_chelsea.layers.linear import ColumnParallelLinear, RowParallelLinear
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
        kv_start, kv_end = shard_range(config.num_key_value_heads, get_tp_rank(), get_tp_size())
        group, d = config.num_queries_per_kv, config.head_dim
        self.num_kv_heads = kv_end - kv_start  # this rank's heads
        self.num_heads = self.num_kv_heads * group
        self.head_dim = d
        self.q_size = self.num_heads * d
        self.kv_size = self.num_kv_heads * d
        self.scaling = d ** -0.5
        q_shard = (kv_start * group * d, kv_end * group * d)
        kv_shard = (kv_start * d, kv_end * d)
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, [q_shard, kv_shard, kv_shard],
                                             bias=config.attention_bias)
        self.o_proj = RowParallelLinear(q_shard, config.hidden_size)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        t = hidden.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        assert forward_batch.rope_cache is not None
        cos, sin = forward_batch.rope_cache
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        out = forward_batch.attn_backend.forward(q, k, v, self.layer_id, forward_batch, self.scaling)
        return self.o_proj(out.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        shard = shard_range(config.intermediate_size, get_tp_rank(), get_tp_size())
        self.intermediate_size = shard[1] - shard[0]  # this rank's columns
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [shard, shard], bias=False)
        self.down_proj = RowParallelLinear(shard, config.hidden_size)

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
        """Load HF-named weights, fusing q/k/v and gate/up (this rank's shard of them)."""
        params = dict(self.named_parameters())
        fused: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            qkv, o_proj = layer.self_attn.qkv_proj, layer.self_attn.o_proj
            fused[f"layers.{i}.self_attn.qkv_proj.weight"] = qkv.shard(
                [weights[attn + f"{n}_proj.weight"] for n in "qkv"])
            if self.config.attention_bias:
                fused[f"layers.{i}.self_attn.qkv_proj.bias"] = qkv.shard(
                    [weights[attn + f"{n}_proj.bias"] for n in "qkv"])
            fused[f"layers.{i}.self_attn.o_proj.weight"] = o_proj.shard(
                weights[attn + "o_proj.weight"])
            fused[f"layers.{i}.mlp.gate_up_proj.weight"] = layer.mlp.gate_up_proj.shard(
                [weights[mlp + "gate_proj.weight"], weights[mlp + "up_proj.weight"]])
            fused[f"layers.{i}.mlp.down_proj.weight"] = layer.mlp.down_proj.shard(
                weights[mlp + "down_proj.weight"])
            for norm in ("input_layernorm", "post_attention_layernorm"):
                fused[f"layers.{i}.{norm}.weight"] = weights[p + norm + ".weight"]
            if self.config.qk_norm:
                for norm in ("q_norm", "k_norm"):
                    fused[f"layers.{i}.self_attn.{norm}.weight"] = weights[attn + norm + ".weight"]
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


ARCHITECTURES = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM,
                 "qwen3": LlamaForCausalLM}
