"""``python -m sglang_chelsea.launch_server --model-path ...``: start the HTTP server."""

from __future__ import annotations

import sys

from sglang_chelsea.server_args import prepare_server_args


def main(argv: list[str] | None = None) -> int:
    """Parse the flags (ServerArgs names) and serve until interrupted."""
    from sglang_chelsea.entrypoints.http_server import launch_server

    return launch_server(prepare_server_args(argv))


if __name__ == "__main__":
    sys.exit(main())
