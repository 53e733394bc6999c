"""Read a GGUF file (llama.cpp format) into a ModelConfig and Hugging Face-named fp tensors.

Every tensor is dequantized with ``gguf.quants.dequantize``; the runtime computes in
floating point. llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` for the
llama architecture only (its rotary layout differs from HF's); that permutation is undone
here so the weights match what ``transformers`` loads from the same file.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

import gguf
import numpy as np
import torch
from tqdm import tqdm

from sglang_chelsea.configs.model_config import ModelConfig

logger = logging.getLogger(__name__)

GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# Tensors that carry nothing the runtime needs (old llama.cpp files store rotary tables).
_IGNORED_SUFFIXES = ("attn_rot_embd",)


def open_gguf(path: str) -> gguf.GGUFReader:
    """Open ``path`` read-only (memory-mapped; tensor data is read lazily)."""
    return gguf.GGUFReader(path, "r")


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """The decoded value of metadata field ``key``, or ``default`` when it is absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _scalar(value: Any, key: str) -> Any:
    """Metadata that some files store per layer (a list): accept it only when uniform."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"GGUF field {key} varies per layer ({value}); not supported")
        return value[0]
    return value


def _float32_value(value: float) -> float:
    """The shortest decimal of a float32 field (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _rope_scaling(reader: gguf.GGUFReader, arch: str) -> Optional[dict]:
    """HF-style rope scaling dict from ``{arch}.rope.scaling.*`` metadata (None when unscaled)."""
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError(
            "This GGUF stores rope frequency factors (rope_freqs.weight, Llama 3.1-style rope "
            "scaling), which the GGUF loader does not support; load the HF checkpoint instead."
        )
    kind = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or factor in (None, 1.0):
        return None
    if kind not in ("linear", "yarn"):
        raise ValueError(f"GGUF rope scaling type {kind!r} is not supported (linear, yarn)")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    original = _field(reader, f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _eos_token_ids(reader: gguf.GGUFReader) -> list[int]:
    """End-of-sequence ids: ``eos`` plus the end-of-turn/-message ids when the file names them."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id"):
        value = _field(reader, key)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def gguf_model_config(reader: gguf.GGUFReader) -> ModelConfig:
    """Build a ModelConfig from the metadata of an opened GGUF file."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        supported = ", ".join(GGUF_ARCHITECTURES)
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {supported}")
    tensor_names = {t.name for t in reader.tensors}

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"GGUF file lacks required metadata {arch}.{key}")
        return _scalar(value, f"{arch}.{key}")

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = int(_scalar(_field(reader, f"{arch}.attention.head_count_kv", heads),
                           "head_count_kv"))
    head_dim = _field(reader, f"{arch}.attention.key_length")
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=int(head_dim) if head_dim is not None else hidden // heads,
        rms_norm_eps=_float32_value(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch),
        max_position_embeddings=int(need("context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=_eos_token_ids(reader),
    )


def hf_tensor_name(gguf_name: str) -> Optional[str]:
    """Map a GGUF tensor name to its HF parameter name (None for tensors the runtime ignores)."""
    base, _, kind = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    match = _BLOCK_RE.match(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    if match and match.group(2) in _IGNORED_SUFFIXES:
        return None
    raise ValueError(f"Unknown GGUF tensor {gguf_name!r}")


def unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs -> HF half-split halves).

    Works for weights (rows, cols) and biases (rows,).
    """
    rows = weight.shape[0]
    cols = weight.shape[1:]
    return (weight.reshape(n_head, rows // n_head // 2, 2, *cols)
            .swapaxes(1, 2)
            .reshape(rows, *cols))


def _dequantize(tensor: gguf.ReaderTensor) -> np.ndarray:
    """Dequantize one tensor to float32 in row-major (PyTorch) order."""
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml lists dimensions fastest-first
    array = np.asarray(array, dtype=np.float32).reshape(shape)
    if not array.flags.writeable:  # an F32 tensor is a view of the read-only memory map
        array = array.copy()
    return array


def load_gguf_weights(
    reader: gguf.GGUFReader, config: ModelConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Dequantize every tensor of ``reader`` into HF-named tensors of ``dtype``."""
    permute_heads = {}
    if config.architecture == "llama":  # llama.cpp permutes q/k for the llama arch only
        permute_heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    weights: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc="Dequantizing GGUF", unit="tensor"):
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue
        array = _dequantize(tensor)
        match = _BLOCK_RE.match(tensor.name)
        if match and match.group(2) in permute_heads:
            array = unpermute_rows(array, permute_heads[match.group(2)])
        weights[name] = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
    return weights


def gguf_chat_template(reader: gguf.GGUFReader) -> Optional[str]:
    """The chat template stored in the GGUF metadata, if any."""
    return _field(reader, "tokenizer.chat_template")
