"""Session-wide fixtures: the default model and tiny random Hugging Face checkpoints."""

from __future__ import annotations

import os

import torch  # importing torch alone does not import triton

# Triton kernels run on the CPU through the interpreter; the flag must be set before any
# import of triton (tiny_models pulls it in through torch._library).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sglang_chelsea.model_loader import default_model_path as _default_model_path  # noqa: E402
from utils.tiny_models import make_tiny_hf_model  # noqa: E402


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


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Qwen3ForCausalLM checkpoint (q/k norms, head_dim 32 != hidden / heads)."""
    return make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny_qwen3")), arch="qwen3")
