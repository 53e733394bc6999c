"""One server on the default model (SmolLM2-135M) shared by the tests of this package."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
import requests
from utils.server_process import ServerProcess, launch_server_process


def default_server(tmp_path_factory: pytest.TempPathFactory, name: str
                   ) -> Iterator[ServerProcess]:
    """A server on the default model with the tests' settings; stopped after the yield."""
    log = tmp_path_factory.mktemp(name) / "server.log"
    srv = launch_server_process(["--max-total-tokens", "20000", "--num-threads", "1",
                                 "--tool-call-parser", "qwen25",
                                 "--reasoning-parser", "qwen3"], log)
    yield srv
    srv.stop()


@pytest.fixture(scope="package")
def server(tmp_path_factory: pytest.TempPathFactory, default_model_path: str
           ) -> Iterator[ServerProcess]:
    yield from default_server(tmp_path_factory, "server")


@pytest.fixture(scope="package")
def url(server: ServerProcess) -> str:
    return server.url


@pytest.fixture
def http(url: str) -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session



@pytest.fixture(scope="package")
def client(url: str) -> Iterator[openai.OpenAI]:
    """The ``openai`` client on the package's server (no retries, 120 s timeout)."""
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                       timeout=120) as c:
        yield c
