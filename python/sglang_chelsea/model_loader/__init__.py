"""Model loading: a GGUF file or Hugging Face checkpoint -> ModelConfig, fp weights, tokenizer."""

from sglang_chelsea.model_loader.default_model import default_model_path
from sglang_chelsea.model_loader.loader import (
    LoadedModel,
    load_model,
    load_model_config,
    load_tokenizer,
    resolve_dtype,
    resolve_model_path,
)

__all__ = [
    "LoadedModel",
    "default_model_path",
    "load_model",
    "load_model_config",
    "load_tokenizer",
    "resolve_dtype",
    "resolve_model_path",
]
