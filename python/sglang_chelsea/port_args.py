"""PortArgs: the ZMQ ipc:// endpoints that connect the server's processes."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from dataclasses import dataclass


@dataclass
class PortArgs:
    """Socket names (``ipc://`` paths in a private temporary directory).

    tokenizer -> scheduler (``scheduler_input_ipc_name``), scheduler -> detokenizer
    (``detokenizer_ipc_name``), detokenizer and scheduler -> tokenizer (``tokenizer_ipc_name``).
    With ``--tp-size`` > 1 the ranks rendezvous on loopback TCP port ``dist_init_port``.
    """

    ipc_dir: str
    tokenizer_ipc_name: str
    scheduler_input_ipc_name: str
    detokenizer_ipc_name: str
    dist_init_port: int = 0

    @classmethod
    def init_new(cls) -> PortArgs:
        """Fresh names in a new temporary directory (removed by :meth:`cleanup`)."""
        ipc_dir = tempfile.mkdtemp(prefix="sglang_chelsea_ipc_")

        def name(sock: str) -> str:
            return "ipc://" + os.path.join(ipc_dir, sock)

        return cls(ipc_dir=ipc_dir, tokenizer_ipc_name=name("tokenizer"),
                   scheduler_input_ipc_name=name("scheduler"),
                   detokenizer_ipc_name=name("detokenizer"), dist_init_port=free_port())

    def cleanup(self) -> None:
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
