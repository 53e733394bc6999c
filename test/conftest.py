"""Session-wide fixtures: the default model and tiny random Hugging Face checkpoints."""

from __future__ import annotations

import pytest

from sglang_chelsea.model_loader import default_model_path as _default_model_path
from utils.tiny_models import make_tiny_hf_model


@pytest.fixture(scope="session")
def default_model_path() -> str:
    """Path of the embedded SmolLM2-135M-Instruct GGUF (downloaded once into the cache)."""
    return _default_model_path()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random LlamaForCausalLM checkpoint (untied lm_head) with the SmolLM2 tokenizer."""
    return make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny_llama")), arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Qwen2ForCausalLM checkpoint (q/k/v biases, tied embeddings)."""
    return make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny_qwen2")), arch="qwen2")
