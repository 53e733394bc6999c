"""--api-key: every endpoint but /health needs ``Authorization: Bearer KEY`` (401 otherwise)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sglang_chelsea.entrypoints.auth import APIKeyMiddleware
from sglang_chelsea.server_args import ServerArgs
from utils.server_process import ServerProcess, launch_server_process

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def keyed_server(tmp_path: Path, tiny_llama_dir: str) -> Iterator[ServerProcess]:
    # A tiny random model: this server checks access control, not text.
    srv = launch_server_process(["--model-path", tiny_llama_dir, "--api-key", KEY,
                                 "--max-total-tokens", "4096", "--num-threads", "1"],
                                tmp_path / "keyed.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tmp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("api_key")


def test_real_server_requires_the_key(keyed_server: ServerProcess) -> None:
    url = keyed_server.url
    good = {"Authorization": f"Bearer {KEY}"}
    assert requests.get(url + "/health", timeout=10).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/get_model_info"), ("GET", "/v1/models"),
                             ("POST", "/generate"), ("POST", "/flush_cache"),
                             ("GET", "/metrics")):
            r = requests.request(method, url + path, headers=headers, timeout=10,
                                 json={"text": "hi"} if method == "POST" else None)
            assert r.status_code == 401, (path, headers)
            assert "Authorization" in r.json()["error"]["message"]
    assert requests.get(url + "/get_model_info", headers=good, timeout=10).status_code == 200
    r = requests.post(url + "/generate", headers=good, timeout=60,
                      json={"text": "hi", "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 2


def test_middleware_without_a_server() -> None:
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {}

    @app.get("/secret")
    def secret() -> dict:
        return {"ok": True}

    app.add_middleware(APIKeyMiddleware, api_key=KEY)
    client = TestClient(app)
    assert client.get("/health").status_code == 200
    assert client.get("/secret").status_code == 401
    assert client.get("/secret", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/secret", headers={"Authorization": f"Bearer {KEY}"}).json() == {"ok": True}


def test_binds_loopback_by_default() -> None:
    assert ServerArgs().host == "127.0.0.1"
