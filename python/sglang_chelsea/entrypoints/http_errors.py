"""Error responses shared by the HTTP endpoints: ``{"error": {"message", "type", "code"}}``."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                500: "InternalServerError", 503: "ServiceUnavailableError"}


def error_body(message: str, status: int = 400) -> dict[str, Any]:
    """The JSON error object (SGLang's and OpenAI's shape; the openai client reads it)."""
    err_type = _ERROR_TYPES.get(status, HTTPStatus(status).phrase.replace(" ", ""))
    return {"error": {"message": message, "type": err_type, "param": None, "code": status}}


def error_response(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse(error_body(message, status), status_code=status)


async def read_json_body(request: Request, allow_empty: bool = False) -> Any:
    """The parsed JSON body; ValueError (-> HTTP 400) for malformed or missing JSON."""
    raw = await request.body()
    if not raw.strip():
        if allow_empty:
            return {}
        raise ValueError("the request body is empty; a JSON object is required")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"invalid JSON in the request body: {exc}") from exc


def validation_error_message(exc: ValidationError) -> str:
    """``field: problem`` for the first error of each field (union members repeat errors)."""
    seen: dict[str, str] = {}
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        seen.setdefault(loc, str(err.get("msg")))
    return "; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in seen.items())
