"""Error responses shared by the HTTP endpoints: ``{"error": {"message", "type", "code"}}``."""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                500: "InternalServerError", 503: "ServiceUnavailableError"}
# A JSON escape of a UTF-16 surrogate: paired ones are fine, a lone one is no text at all.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


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
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"invalid JSON in the request body: {exc}") from exc
    except RecursionError:
        raise ValueError("invalid JSON in the request body: arrays or objects are nested too "
                         "deeply") from None
    if _SURROGATE_ESCAPE.search(raw):
        # json.loads keeps an unpaired "\\ud800" as a lone surrogate, which the tokenizer and
        # the UTF-8 response encoder reject later (HTTP 500): refuse it here.
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError("invalid JSON in the request body: a string contains an unpaired "
                             f"UTF-16 surrogate ({exc.object[exc.start:exc.end]!r})") from exc
    return body


def validation_error_message(exc: ValidationError) -> str:
    """``field: problem`` for the first error of each field (union members repeat errors)."""
    seen: dict[str, str] = {}
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        seen.setdefault(loc, str(err.get("msg")))
    return "; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in seen.items())
