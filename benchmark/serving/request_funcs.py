"""One benchmark request against an SGLang-compatible server, timed per streamed chunk.

``sglang``: ``POST /generate`` with the body SGLang's client sends (``sampling_params``
{temperature, max_new_tokens, ignore_eos}, ``stream``, ``lora_path: null``,
``return_logprob: false``, ``return_routed_experts: false``, ``logprob_start_len: -1``).
Each SSE chunk carries the cumulative ``text`` and ``meta_info.completion_tokens``; the
gap between two chunks is spread evenly over the tokens that arrived with the later one.
``sglang-oai``: ``POST /v1/completions``; each chunk carries new text only.
TTFT is the time to the first chunk with non-empty text.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp

from serving.datasets import Prompt

# Long prefills on a CPU: a request may wait many minutes before its first token.
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=6 * 3600)


@dataclass
class RequestInput:
    prompt: Prompt
    api_url: str
    prompt_len: int
    output_len: int
    model: str
    stream: bool = True
    ignore_eos: bool = True
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class RequestOutput:
    success: bool = False
    generated_text: str = ""
    latency: float = 0.0  # seconds, send -> last chunk
    ttft: float = 0.0  # seconds, send -> first chunk with text
    itl: list[float] = field(default_factory=list)  # one entry per token after the first
    prompt_len: int = 0
    output_len: int = 0
    cached_tokens: Optional[int] = None  # as the server reports it (meta_info / usage)
    start_time: float = 0.0
    error: str = ""


def sse_payloads(line: bytes) -> Optional[bytes]:
    """The JSON payload of one SSE line; None for blank lines and ``[DONE]``."""
    line = line.strip()
    if line.startswith(b"data:"):
        line = line[5:].strip()
    if not line or line == b"[DONE]":
        return None
    return line


def generate_payload(inp: RequestInput) -> dict[str, Any]:
    return {
        ("input_ids" if isinstance(inp.prompt, list) else "text"): inp.prompt,
        "sampling_params": {"temperature": inp.temperature, "max_new_tokens": inp.output_len,
                            "ignore_eos": inp.ignore_eos},
        "stream": inp.stream,
        "lora_path": None,
        "return_logprob": False,
        "return_routed_experts": False,
        "logprob_start_len": -1,
        **inp.extra_body,
    }


def completions_payload(inp: RequestInput) -> dict[str, Any]:
    return {"model": inp.model, "prompt": inp.prompt, "best_of": 1,
            "max_tokens": inp.output_len, "stream": inp.stream,
            "temperature": inp.temperature, "ignore_eos": inp.ignore_eos, **inp.extra_body}


class ChunkClock:
    """Turns the arrival of chunks into TTFT and inter-token latencies."""

    def __init__(self, out: RequestOutput) -> None:
        self.out = out
        self.start = out.start_time
        self.last = out.start_time
        self.tokens = 0

    def arrived(self, total_tokens: int) -> None:
        """A chunk with text arrived; ``total_tokens`` generated so far."""
        now = time.perf_counter()
        if self.tokens == 0:
            self.out.ttft = now - self.start
        elif total_tokens > self.tokens:
            gap = (now - self.last) / (total_tokens - self.tokens)
            self.out.itl.extend([gap] * (total_tokens - self.tokens))
        else:
            return  # no new token (e.g. a chunk that only completes a character)
        self.last = now
        self.tokens = max(total_tokens, 1)


def read_usage(data: dict[str, Any], out: RequestOutput) -> None:
    """Prompt length and cached tokens as the server reports them, when it does."""
    info = data.get("meta_info") or data.get("usage") or {}
    if info.get("prompt_tokens"):
        out.prompt_len = info["prompt_tokens"]
    cached = info.get("cached_tokens")
    if cached is None:
        cached = (info.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is not None:
        out.cached_tokens = int(cached)


async def stream_request(session: aiohttp.ClientSession, inp: RequestInput,
                         payload: dict[str, Any],
                         on_data: Callable[[dict[str, Any], RequestOutput, ChunkClock], None]
                         ) -> RequestOutput:
    """POST ``payload`` to ``inp.api_url`` and feed every streamed JSON object to
    ``on_data``; times the request and records usage. A failure goes into ``out.error``."""
    out = RequestOutput(prompt_len=inp.prompt_len, output_len=inp.output_len)
    out.start_time = time.perf_counter()
    clock = ChunkClock(out)
    try:
        async with session.post(inp.api_url, json=payload, headers=inp.headers) as resp:
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {await resp.text()}"
                return out
            async for line in resp.content:
                raw = sse_payloads(line)
                if raw is None:
                    continue
                data = json.loads(raw)
                read_usage(data, out)
                on_data(data, out, clock)
            out.latency = time.perf_counter() - out.start_time
            out.success = True
    except Exception:  # the error text goes into the results, the run goes on
        out.error = traceback.format_exc()
    return out


async def request_sglang_generate(session: aiohttp.ClientSession, inp: RequestInput
                                  ) -> RequestOutput:
    def on_data(data: dict[str, Any], out: RequestOutput, clock: ChunkClock) -> None:
        if data.get("text"):
            out.generated_text = data["text"]
            out.output_len = data["meta_info"]["completion_tokens"]
            clock.arrived(out.output_len)

    return await stream_request(session, inp, generate_payload(inp), on_data)


async def request_openai_completions(session: aiohttp.ClientSession, inp: RequestInput
                                     ) -> RequestOutput:
    text_chunks = 0

    def on_data(data: dict[str, Any], out: RequestOutput, clock: ChunkClock) -> None:
        nonlocal text_chunks
        if data.get("usage"):
            out.output_len = data["usage"].get("completion_tokens", out.output_len)
        choices = data.get("choices") or []
        if choices and choices[0].get("text"):
            out.generated_text += choices[0]["text"]
            text_chunks += 1
            clock.arrived(text_chunks)

    return await stream_request(session, inp, completions_payload(inp), on_data)


RequestFunc = Callable[[aiohttp.ClientSession, RequestInput], Awaitable[RequestOutput]]

BACKENDS: dict[str, tuple[str, RequestFunc]] = {
    "sglang": ("/generate", request_sglang_generate),
    "sglang-native": ("/generate", request_sglang_generate),
    "sglang-oai": ("/v1/completions", request_openai_completions),
}
