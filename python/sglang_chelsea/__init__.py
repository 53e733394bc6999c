"""sglang-chelsea: an SGLang-compatible serving runtime with a clustered KV cache."""

from typing import Any

__all__ = ["Engine", "ServerArgs"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must not load torch-heavy modules.
    if name == "Engine":
        from sglang_chelsea.entrypoints.engine import Engine

        return Engine
    if name == "ServerArgs":
        from sglang_chelsea.server_args import ServerArgs

        return ServerArgs
    raise AttributeError(name)
