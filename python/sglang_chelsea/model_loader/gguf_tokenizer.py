"""The tokenizer of a GGUF file, converted once by transformers and cached on disk.

Converting a GGUF vocabulary with ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` takes
about 4 s for SmolLM2's 49k tokens on this machine, while loading the saved
``tokenizer.json`` takes about 0.3 s. Every process that needs the tokenizer (tokenizer
manager, detokenizer, scheduler) shares one converted copy (see ``gguf_cache``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from sglang_chelsea.model_loader.gguf_cache import gguf_cache_entry
from sglang_chelsea.model_loader.gguf_loader import gguf_chat_template, open_gguf


def _convert(path: str) -> Any:
    """Convert the GGUF vocabulary with transformers; keep the file's chat template."""
    directory, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    if not getattr(tokenizer, "chat_template", None):
        template = gguf_chat_template(open_gguf(path))
        if template:
            tokenizer.chat_template = template
    return tokenizer


def _save_atomically(tokenizer: Any, target: Path) -> None:
    """Save into a temporary sibling directory, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # another process winning the race is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_gguf_tokenizer(path: str) -> Any:
    """The transformers tokenizer of GGUF file ``path`` (from the on-disk cache when possible)."""
    target = gguf_cache_entry(path) / "tokenizer"
    if target.is_dir():
        return AutoTokenizer.from_pretrained(str(target))
    tokenizer = _convert(path)
    try:
        _save_atomically(tokenizer, target)
    except OSError:
        pass  # a read-only cache only costs speed
    return tokenizer
