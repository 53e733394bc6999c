"""Every KV policy serves through the HTTP server and SGLang's frontend language.

One server per policy on the default model, with chunk, window and budget sizes small
enough that a ~700-token shared prefix is compressed, evicted or selected from. A frontend
program (a shared prefix forked over several items by ``run_batch``, then a select) runs
against it; the server's ``kv_cache`` statistics show the policy acted, and after
``/flush_cache`` every KV slot is free again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from utils.server_process import ServerProcess, launch_server_process

sgl = pytest.importorskip("sglang", reason="install the sglang wheel with --no-deps (make setup)")

CHUNK = ["--chelsea-chunk-size", "32"]
CLUSTERKV = ["--kv-compression", "clusterkv", *CHUNK, "--clusterkv-window", "64",
             "--clusterkv-tokens-per-cluster", "8", "--clusterkv-sink-tokens", "4",
             "--clusterkv-full-layers", "0", "--clusterkv-budget", "64"]
# policy -> (server flags, what its kv_cache statistics must show)
POLICIES: dict[str, tuple[list[str], Callable[[dict], bool]]] = {
    "chelsea": (["--kv-compression", "chelsea", *CHUNK, "--chelsea-keep-ratio", "0.25"],
                lambda kv: kv["clustered_chunks"] > 0 and kv["compression_ratio"] > 1),
    "chelsea_recall": (["--kv-compression", "chelsea", *CHUNK, "--chelsea-keep-ratio", "0.25",
                        "--chelsea-recall-budget", "32"],
                       lambda kv: kv["clustered_chunks"] > 0 and kv["host_slots"] > 0),
    "clusterkv": (CLUSTERKV, lambda kv: kv["clustered_windows"] > 0
                  and 0 < kv["selected_share"] < 1),
    "clusterkv_offload": ([*CLUSTERKV, "--kv-offload"],
                          lambda kv: kv["offloaded_windows"] > 0 and kv["host_slots"] > 0),
    "streaming": (["--kv-compression", "streaming", *CHUNK, "--streaming-window", "128"],
                  lambda kv: kv["evicted_pages"] > 0),
    "snapkv": (["--kv-compression", "snapkv", *CHUNK, "--snapkv-budget", "96",
                "--snapkv-window", "16"], lambda kv: kv["evicted_tokens"] > 0),
}

LONG_PREFIX = " ".join(f"Sentence {i} of a long shared context about colors." for i in range(60))


@sgl.function
def colors(s: Any, item: str) -> None:
    s += LONG_PREFIX + "\nThe item is " + item + ". In one word, its color is"
    s += sgl.gen("color", max_tokens=12, temperature=0)
    s += "\nIs that right? Answer:"
    s += sgl.select("verdict", choices=[" yes", " no"])


@pytest.fixture(scope="module", params=sorted(POLICIES))
def policy_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                  default_model_path: str) -> Iterator[tuple[str, ServerProcess]]:
    name = request.param
    log = tmp_path_factory.mktemp(f"server_{name}") / "server.log"
    srv = launch_server_process(["--max-total-tokens", "8000", "--num-threads", "1",
                                 *POLICIES[name][0]], log)
    yield name, srv
    srv.stop()


def test_frontend_program_on_each_policy(policy_server: tuple[str, ServerProcess]) -> None:
    from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

    name, srv = policy_server
    sgl.set_default_backend(RuntimeEndpoint(srv.url))
    states = colors.run_batch([{"item": x} for x in ("sky", "grass", "snow")])
    for state in states:
        assert state.error() is None, (name, state.error())
        assert state["color"].strip(), name
        assert state["verdict"] in (" yes", " no")
    kv = requests.get(f"{srv.url}/get_server_info", timeout=30).json()["kv_cache"]
    assert POLICIES[name][1](kv), (name, kv)
    assert requests.post(f"{srv.url}/flush_cache", timeout=30).status_code == 200
    kv = requests.get(f"{srv.url}/get_server_info", timeout=30).json()["kv_cache"]
    assert kv["free_slots"] == kv["total_slots"], (name, kv)
