"""The architecture facts the runtime needs about a model, independent of its file format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelConfig:
    """Decoder-only transformer hyper-parameters (Llama family, Qwen2 and Qwen3).

    Weights loaded for a ModelConfig always use Hugging Face parameter names
    (``model.layers.0.self_attn.q_proj.weight``...), whatever the file format.
    """

    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # HF rope_parameters/rope_scaling dict (llama3, linear...)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    qk_norm: bool = False  # Qwen3: per-head RMSNorm of q and k before the rotary embedding
    bos_token_id: Optional[int] = None
    eos_token_ids: list[int] = field(default_factory=list)
    # the transformers PretrainedConfig, when available (left out of repr and ==)
    hf_config: Optional[object] = field(default=None, repr=False, compare=False)

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads
