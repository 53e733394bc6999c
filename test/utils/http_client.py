"""Small HTTP helpers for the server tests: /generate calls and streamed events."""

from __future__ import annotations

import json
from typing import Any

import requests


def post(url: str, body: Any, **kwargs: Any) -> requests.Response:
    return requests.post(url + "/generate", json=body, timeout=120, **kwargs)


def stream_events(url: str, body: dict[str, Any]) -> list[Any]:
    """Every ``data:`` payload of a streamed /generate (``"[DONE]"`` kept as a string)."""
    events = []
    with requests.post(url + "/generate", json={**body, "stream": True}, stream=True,
                       timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines(decode_unicode=True):
            if line:
                assert line.startswith("data: ")
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
