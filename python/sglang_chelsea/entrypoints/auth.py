"""API key check: with ``--api-key``, every endpoint except ``/health`` needs the bearer token."""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from sglang_chelsea.entrypoints.http_errors import error_response

OPEN_PATHS = frozenset({"/health"})


class APIKeyMiddleware:
    """Pure ASGI middleware (so streaming and disconnect detection pass through untouched)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS \
                or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        if not secrets.compare_digest(header, self.expected):
            message = ("missing Authorization header" if not header
                       else "invalid API key") + ": send 'Authorization: Bearer <api-key>'"
            await error_response(message, 401)(scope, receive, send)
            return
        await self.app(scope, receive, send)
