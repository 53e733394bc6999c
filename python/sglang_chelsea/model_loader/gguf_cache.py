"""On-disk cache of what is slow to derive from a GGUF file: its ModelConfig and tokenizer.

Parsing a GGUF's metadata with ``gguf.GGUFReader`` takes about 2 s (it decodes the whole
vocabulary), and converting its tokenizer with transformers about 4 s more. Processes that
need only the config or the tokenizer (HTTP server, detokenizer) read the cached copies.
An entry is keyed by the file's absolute path, modification time and size, and the
versions of the libraries that produced it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import gguf
import transformers

from sglang_chelsea.configs.model_config import ModelConfig
from sglang_chelsea.model_loader.default_model import cache_dir
from sglang_chelsea.model_loader.gguf_loader import gguf_model_config, open_gguf

_CONFIG_FILE = "model_config.json"
_FORMAT_VERSION = 1  # bump when what is cached changes meaning


def gguf_cache_entry(path: str) -> Path:
    """The cache directory for GGUF file ``path`` (not created)."""
    stat = os.stat(path)
    raw = "|".join([
        os.path.abspath(path), str(stat.st_mtime_ns), str(stat.st_size),
        transformers.__version__, getattr(gguf, "__version__", ""), str(_FORMAT_VERSION),
    ])
    return cache_dir() / "gguf" / hashlib.sha256(raw.encode()).hexdigest()[:20]


def write_text_atomically(target: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling of ``target``, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_cached_config(file: Path) -> Optional[ModelConfig]:
    try:
        with open(file, encoding="utf-8") as f:
            return ModelConfig(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def cached_gguf_model_config(path: str) -> ModelConfig:
    """The ModelConfig of GGUF file ``path``, parsed once and then read from the cache."""
    file = gguf_cache_entry(path) / _CONFIG_FILE
    config = _read_cached_config(file)
    if config is not None:
        return config
    config = gguf_model_config(open_gguf(path))
    fields = dataclasses.asdict(config)
    fields.pop("hf_config")
    try:
        write_text_atomically(file, json.dumps(fields, indent=1))
    except OSError:
        pass  # a read-only cache only costs speed
    return config
