"""CPU serving keeps freed host memory in the heap (glibc mallopt), unless disabled."""

from __future__ import annotations

import pytest

from sglang_chelsea.model_executor import model_runner
from sglang_chelsea.utils.host_memory import retain_freed_host_memory


def test_mallopt_applies_on_glibc() -> None:
    # The project's machines run glibc Linux: the thresholds are accepted.
    assert retain_freed_host_memory() is True


@pytest.mark.parametrize("disabled", [False, True])
def test_model_runner_tunes_the_cpu_allocator_unless_disabled(
        tiny_llama_dir: str, disabled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from sglang_chelsea.server_args import ServerArgs

    calls: list[bool] = []
    monkeypatch.setattr(model_runner, "retain_freed_host_memory", lambda: calls.append(True))
    args = ServerArgs(model_path=tiny_llama_dir, device="cpu", max_total_tokens=256,
                      disable_cpu_malloc_tuning=disabled)
    model_runner.ModelRunner(args)
    assert calls == ([] if disabled else [True])
