"""The Triton attention backend inside the engine gives the torch backend's outputs: full
cache and Chelsea (centroid slots with size weights), prefill chunks and decode, batched.
On the CPU the kernels run through the Triton interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest

from sglang_chelsea import Engine
from utils.runtime import random_ids

PARAMS = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}



def _run(model_path: str, backend: str, **kw) -> list[dict]:
    engine = Engine(model_path=model_path, attention_backend=backend, max_total_tokens=3000,
                    log_level="warning", chunked_prefill_size=48, **kw)
    try:
        # Two prompts batched together, then one sharing the first's prefix (a radix hit).
        first = engine.generate(input_ids=[random_ids(150, 0), random_ids(70, 1)],
                                sampling_params=PARAMS, return_logprob=True)
        hit = engine.generate(input_ids=random_ids(150, 0)[:130] + random_ids(20, 2),
                              sampling_params=PARAMS, return_logprob=True)
        return first + [hit]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("policy", [
    {},
    {"kv_compression": "chelsea", "chelsea_chunk_size": 32, "chelsea_keep_ratio": 0.5},
])
def test_triton_backend_matches_torch_backend(tiny_llama_dir: str, policy: dict) -> None:
    ref = _run(tiny_llama_dir, "torch", **policy)
    got = _run(tiny_llama_dir, "triton", **policy)
    assert got[2]["meta_info"]["cached_tokens"] > 0
    for a, b in zip(got, ref):
        assert a["output_ids"] == b["output_ids"]
        lp_a = [lp for lp, _, _ in a["meta_info"]["output_token_logprobs"]]
        lp_b = [lp for lp, _, _ in b["meta_info"]["output_token_logprobs"]]
        assert lp_a == pytest.approx(lp_b, abs=1e-4)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch) -> None:
    from sglang_chelsea.server_args import ServerArgs

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs --device cuda"):
        ServerArgs(attention_backend="triton", device="cpu")


# Selecting policies: per-query-head slot lists (ClusterKV) and host-tier recall (Chelsea).
SELECTING = {
    "clusterkv": {"kv_compression": "clusterkv", "chelsea_chunk_size": 32,
                  "clusterkv_window": 64, "clusterkv_tokens_per_cluster": 8,
                  "clusterkv_sink_tokens": 4, "clusterkv_full_layers": 0,
                  "clusterkv_budget": 40},
    "recall": {"kv_compression": "chelsea", "chelsea_chunk_size": 32,
               "chelsea_keep_ratio": 0.25, "chelsea_sink_tokens": 4,
               "chelsea_min_similarity": -1.0, "chelsea_recall_budget": 16},
}
# ClusterKV with its clustered windows in the host tier (read through a working set).
SELECTING["offload"] = {**SELECTING["clusterkv"], "kv_offload": True}


def _run_selecting(model_path: str, backend: str, policy: dict) -> tuple[list[dict], dict]:
    engine = Engine(model_path=model_path, attention_backend=backend, max_total_tokens=3000,
                    log_level="warning", chunked_prefill_size=64, **policy)
    try:
        # Two long prompts (selections in decode; for recall also in their later prefill
        # chunks, over the compressed prefix) batched with a short one (no selection: whole
        # lists).
        out = engine.generate(input_ids=[random_ids(200, 3), random_ids(40, 4),
                                         random_ids(170, 5)],
                              sampling_params=PARAMS, return_logprob=True)
        return out, engine.get_server_info()["kv_cache"]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("name", sorted(SELECTING))
def test_selecting_policies_on_triton_match_torch_backend(tiny_llama_dir: str, name: str,
                                                          monkeypatch) -> None:
    from sglang_chelsea.attention.triton_backend import TritonAttnBackend

    ref, kv_ref = _run_selecting(tiny_llama_dir, "torch", SELECTING[name])
    # Record which per-head paths the Triton backend took: (decode?, host segment?).
    paths: set[tuple[bool, bool]] = set()
    head_lists = TritonAttnBackend._head_lists

    def spy(self, layer_id, forward_batch, q):
        lists = head_lists(self, layer_id, forward_batch, q)
        if lists is not None:
            paths.add((forward_batch.forward_mode.is_decode(), lists.host is not None))
        return lists

    monkeypatch.setattr(TritonAttnBackend, "_head_lists", spy)
    # ClusterKV's decode layers take the batched lane (one selection for all requests).
    from sglang_chelsea.compression.base import BatchSelection
    from sglang_chelsea.compression.clusterkv import ClusterKVSelector

    batched: list[bool] = []
    select_batch = ClusterKVSelector.select_batch

    def spy_batch(self, *args):
        out = select_batch(self, *args)
        batched.append(isinstance(out, BatchSelection))
        return out

    monkeypatch.setattr(ClusterKVSelector, "select_batch", spy_batch)
    got, kv_got = _run_selecting(tiny_llama_dir, "triton", SELECTING[name])
    assert any(batched) == (name == "clusterkv")
    # ClusterKV selects at decode only; recall in decode and in prefill chunks, from the host;
    # offloaded ClusterKV reads its windows from the host in both.
    assert paths == ({(True, False)} if name == "clusterkv" else {(True, True), (False, True)})
    if name != "recall":  # the same selections were made, and they did select
        assert kv_got["selected_share"] == kv_ref["selected_share"]
        assert 0 < kv_got["selected_share"] < 1
    else:  # raw chunks went to the host tier and could be recalled
        assert kv_got["host_slots"] == kv_ref["host_slots"] > 0
    for a, b in zip(got, ref):
        assert a["output_ids"] == b["output_ids"]
        lp_a = [lp for lp, _, _ in a["meta_info"]["output_token_logprobs"]]
        lp_b = [lp for lp, _, _ in b["meta_info"]["output_token_logprobs"]]
        assert lp_a == pytest.approx(lp_b, abs=1e-4)


def test_cuda_graphs_do_not_replay_a_decode_step_with_a_selection() -> None:
    from types import SimpleNamespace

    from sglang_chelsea.model_executor.cuda_graph_runner import CudaGraphRunner
    from sglang_chelsea.model_executor.forward_batch_info import ForwardMode

    runner = SimpleNamespace(max_bs=8)  # can_run reads only the largest captured size
    step = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=4, slot_selector=None)
    assert CudaGraphRunner.can_run(runner, step)
    step.slot_selector = object()
    assert not CudaGraphRunner.can_run(runner, step)
