"""Logging set-up shared by the server's processes (SGLang's ``[time] message`` format)."""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "[%(asctime)s%(prefix)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class _PrefixFilter(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        record.prefix = self.prefix
        return True


def configure_logger(log_level: str, prefix: str = "") -> None:
    """Send every record at ``log_level`` or above to stderr as ``[time prefix] message``.

    ``prefix`` names the process (e.g. ``" Scheduler"``); replaces earlier handlers.
    """
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise ValueError(f"unknown log level {log_level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    handler.addFilter(_PrefixFilter(prefix))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
