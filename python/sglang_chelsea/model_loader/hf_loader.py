"""Load a Hugging Face checkpoint directory (config.json + *.safetensors + tokenizer)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import torch
from safetensors import safe_open
from tqdm import tqdm
from transformers import AutoConfig, GenerationConfig

from sglang_chelsea.configs.model_config import ModelConfig

logger = logging.getLogger(__name__)

HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SAFETENSORS_INDEX = "model.safetensors.index.json"


def _as_id_list(value: Any) -> list[int]:
    """Normalise an HF ``eos_token_id`` (None, int or list) to a list of ints."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _rope(hf_config: Any) -> tuple[float, Optional[dict]]:
    """(rope theta, rope scaling dict or None) from transformers 5 or older config layouts."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    legacy = getattr(hf_config, "rope_scaling", None)
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    scaling = params if params.get("rope_type", "default") != "default" else None
    if scaling is None and legacy and legacy.get("rope_type", legacy.get("type")) != "default":
        scaling = legacy
    return float(theta), (dict(scaling) if scaling else None)


def _eos_token_ids(model_dir: str, hf_config: Any) -> list[int]:
    """eos ids of config.json, plus those of generation_config.json (chat models list several)."""
    ids = _as_id_list(getattr(hf_config, "eos_token_id", None))
    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except (OSError, ValueError):
        return ids
    return ids + [i for i in _as_id_list(generation.eos_token_id) if i not in ids]


def _warn_sliding_window(hf_config: Any) -> None:
    """The runtime attends to the full context; say so when the checkpoint asks otherwise."""
    window = getattr(hf_config, "sliding_window", None)
    enabled = getattr(hf_config, "use_sliding_window", True)  # Qwen2 has an on/off switch
    if window and enabled and window < hf_config.max_position_embeddings:
        logger.warning("sliding_window=%d is ignored: attention spans the whole context", window)


def hf_model_config(model_dir: str) -> ModelConfig:
    """Build a ModelConfig from ``model_dir/config.json`` through ``transformers.AutoConfig``."""
    hf_config = AutoConfig.from_pretrained(model_dir)
    names = list(getattr(hf_config, "architectures", None) or [])
    arch = next((HF_ARCHITECTURES[n] for n in names if n in HF_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"Model architecture {names or hf_config.model_type!r} is not supported; "
            f"supported: {', '.join(HF_ARCHITECTURES)}"
        )
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("Checkpoints with mlp_bias=True are not supported")
    _warn_sliding_window(hf_config)
    theta, scaling = _rope(hf_config)
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    bos = getattr(hf_config, "bos_token_id", None)
    return ModelConfig(
        architecture=arch,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf_config.rms_norm_eps),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
        qk_norm=arch == "qwen3",
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=_eos_token_ids(model_dir, hf_config),
        hf_config=hf_config,
    )


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's safetensors shards (from the index file when there is one)."""
    index_path = os.path.join(model_dir, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, s) for s in shards]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(
            f"No *.safetensors weights in {model_dir} (PyTorch .bin checkpoints are not supported)"
        )
    return [os.path.join(model_dir, f) for f in files]


def _wanted(name: str, config: ModelConfig) -> bool:
    """Skip buffers some checkpoints store, and the tied lm_head (it is the embedding)."""
    if name.endswith("rotary_emb.inv_freq"):
        return False
    return not (config.tie_word_embeddings and name == "lm_head.weight")


def load_hf_weights(
    model_dir: str, config: ModelConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Read every safetensors shard of ``model_dir`` into HF-named tensors of ``dtype``."""
    weights: dict[str, torch.Tensor] = {}
    for path in tqdm(safetensors_files(model_dir), desc="Loading safetensors", unit="file"):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if _wanted(name, config):
                    weights[name] = f.get_tensor(name).to(dtype)
    return weights
