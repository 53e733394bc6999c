"""SGLang's own frontend test programs (``sglang.test.test_programs`` from the sglang wheel)
against our server, through RuntimeEndpoint with the ChatML template.

PASSING programs must pass as SGLang ships them. KNOWLEDGE programs assert facts a 135M
model does not know: they run with ``check_answer=False`` where they take it; otherwise the
only failure accepted is the program's own final answer assertion (every generation and
select ran by then). Left out, with the reasons in docs/structured-outputs.md:
test_image_qa, test_gen_min_new_tokens, test_completion_speculative, test_parallel_encoding,
test_chat_completion_speculative.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
from utils.server_process import ServerProcess

from .conftest import default_server

sgl = pytest.importorskip("sglang", reason="install the sglang wheel with --no-deps (make setup)")
programs = pytest.importorskip("sglang.test.test_programs")

PASSING = ["test_mt_bench", "test_parallel_decoding", "test_regex", "test_stream",
           "test_tool_use", "test_dtype_gen", "test_decode_int", "test_decode_json", "test_decode_json_regex",
           "test_stream_logprobs"]
KNOWLEDGE_WITH_FLAG = ["test_select", "test_expert_answer"]
KNOWLEDGE_ASSERTING = ["test_few_shot_qa", "test_react"]


@pytest.fixture(scope="module")
def peer_server(tmp_path_factory: pytest.TempPathFactory, default_model_path: str
                ) -> Iterator[ServerProcess]:
    """A server of its own, fresh as when the programs run alone (the package's shared
    server has served other tests' batches by then)."""
    yield from default_server(tmp_path_factory, "peer_server")


@pytest.fixture(scope="module")
def backend(peer_server: ServerProcess) -> Any:
    url = peer_server.url
    from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

    backend = RuntimeEndpoint(url, chat_template_name="chatml")
    sgl.set_default_backend(backend)
    return backend


@pytest.fixture(autouse=True)
def _empty_cache(backend: Any) -> None:
    """Each program starts from an empty radix cache, as when run alone: whether an earlier
    program left a prefix cached changes the attention's float rounding (cached part and
    new part merged by log-sum-exp), and the 135M model's "365 vs 366 days" is a near tie
    that such rounding can flip."""
    deadline = time.monotonic() + 60
    while True:  # a previous program's last request may still be finishing
        try:
            backend.flush_cache()
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.parametrize("name", PASSING)
def test_program_passes(backend: Any, name: str) -> None:
    getattr(programs, name)()


@pytest.mark.parametrize("name", KNOWLEDGE_WITH_FLAG)
def test_program_runs_without_answer_check(backend: Any, name: str) -> None:
    getattr(programs, name)(check_answer=False)


@pytest.mark.parametrize("name", KNOWLEDGE_ASSERTING)
def test_program_runs_to_its_answer_check(backend: Any, name: str) -> None:
    try:
        getattr(programs, name)()
    except AssertionError as exc:
        last = traceback.extract_tb(exc.__traceback__)[-1]
        # Raised by the program's own final assertion, not by the frontend or a generation.
        assert last.filename == programs.__file__ and last.name == name, \
            "".join(traceback.format_exception(exc))
