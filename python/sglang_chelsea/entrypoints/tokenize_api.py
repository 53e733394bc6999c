"""SGLang's ``/tokenize`` and ``/detokenize`` endpoints (also under ``/v1/``).

``POST /tokenize`` ``{"prompt": str | [str], "add_special_tokens": true}`` returns
``{"tokens", "count", "max_model_len"}`` (lists of lists and of counts for a list of
prompts); ``POST /detokenize`` ``{"tokens": [int] | [[int]], "skip_special_tokens": true}``
returns ``{"text"}``. Both run the server's own tokenizer, so a client can count or build
prompts exactly as ``/generate`` will see them.
"""

from __future__ import annotations

from typing import Any, Union

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError

from sglang_chelsea.entrypoints.http_errors import error_response, validation_error_message


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: Union[StrictStr, list[StrictStr]]
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: Union[list[StrictInt], list[list[StrictInt]]]
    skip_special_tokens: bool = True


class TokenizeServing:
    """The two endpoints over a tokenizer (None with ``--skip-tokenizer-init``)."""

    def __init__(self, tokenizer: Any, vocab_size: int, context_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context_len = context_len

    def _parse(self, model: type[BaseModel], body: Any) -> tuple[Any, Response | None]:
        """The validated request, or the 400 to answer instead."""
        try:
            req = model.model_validate(body)
        except ValidationError as exc:
            return None, error_response(validation_error_message(exc))
        if self.tokenizer is None:
            return None, error_response("the server was started with --skip-tokenizer-init: "
                                        "it has no tokenizer to (de)tokenize with")
        return req, None

    async def tokenize(self, body: Any, raw_request: Request | None = None) -> Response:
        """The response of ``/tokenize`` for a parsed JSON body (400 on a bad body)."""
        req, error = self._parse(TokenizeRequest, body)
        if error is not None:
            return error
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        ids = [self.tokenizer.encode(p, add_special_tokens=req.add_special_tokens)
               for p in prompts]
        if isinstance(req.prompt, str):
            return JSONResponse({"tokens": ids[0], "count": len(ids[0]),
                                 "max_model_len": self.context_len})
        return JSONResponse({"tokens": ids, "count": [len(i) for i in ids],
                             "max_model_len": self.context_len})

    async def detokenize(self, body: Any, raw_request: Request | None = None) -> Response:
        """The response of ``/detokenize`` for a parsed JSON body (400 on a bad body or an
        id outside the vocabulary)."""
        req, error = self._parse(DetokenizeRequest, body)
        if error is not None:
            return error
        single = not req.tokens or isinstance(req.tokens[0], int)
        seqs = [req.tokens] if single else req.tokens
        for seq in seqs:
            bad = [t for t in seq if not 0 <= t < self.vocab_size]
            if bad:
                return error_response(f"token id {bad[0]} is outside the vocabulary "
                                      f"[0, {self.vocab_size})")
        texts = [self.tokenizer.decode(seq, skip_special_tokens=req.skip_special_tokens)
                 for seq in seqs]
        return JSONResponse({"text": texts[0] if single else texts})
