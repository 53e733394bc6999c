"""bench_accuracy.py's policy specs become the engine flags they claim (one parser for all)."""

from __future__ import annotations

import pytest
from bench_accuracy import parse_policy
from sglang_chelsea.server_args import ServerArgs


def test_snapkv_spec_by_share_or_by_budget() -> None:
    # keep=R: R x context slots in all (budget + window), as streaming:keep=R holds.
    args = parse_policy("snapkv:keep=0.2").engine_args(4096)
    assert args == {"kv_compression": "snapkv", "chelsea_chunk_size": 128,
                    "snapkv_budget": 819 - 32, "snapkv_window": 32, "snapkv_kernel_size": 7}
    stream = parse_policy("streaming:keep=0.2").engine_args(4096)
    assert args["snapkv_budget"] + args["snapkv_window"] == stream["streaming_window"]
    args = parse_policy("snapkv:budget=500,window=16,kernel=5").engine_args(4096)
    assert (args["snapkv_budget"], args["snapkv_window"], args["snapkv_kernel_size"]) == \
        (500, 16, 5)
    ServerArgs(device="cpu", **args)  # valid flags


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        parse_policy("h2o:keep=0.2")


@pytest.mark.parametrize("spec", ["streaming:keep=0.25,chunk=32", "snapkv:keep=0.2,chunk=64",
                                  "chelsea:keep=0.25,chunk=512,round=0.0625,recent=2",
                                  "clusterkv:keep=0.25,tpc=16",
                                  "chelsea:keep=0.04,chunk=64,recent=15,rep=medoid"])
def test_every_spec_gives_valid_flags(spec: str) -> None:
    """Spec values arrive as strings; the engine flags they give are typed and valid."""
    args = parse_policy(spec).engine_args(4096)
    ServerArgs(device="cpu", **args)
    if "chunk=" in spec:
        assert args["chelsea_chunk_size"] == int(spec.split("chunk=")[1].split(",")[0])


def test_chelsea_query_weighting_spec() -> None:
    assert parse_policy("chelsea:keep=0.5,qw=1").engine_args(4096)["chelsea_query_weighting"]
    assert not parse_policy("chelsea:keep=0.5").engine_args(4096)["chelsea_query_weighting"]


def test_chelsea_representative_spec() -> None:
    assert parse_policy("chelsea:keep=0.5,rep=medoid").engine_args(4096)[
        "chelsea_representative"] == "medoid"
    assert parse_policy("chelsea:keep=0.5").engine_args(4096)["chelsea_representative"] == "mean"


def test_chelsea_window_spec_scales_the_raw_chunks_with_the_context() -> None:
    """window=F keeps about F x context tokens raw, in whole chunks, as streaming:keep=F."""
    spec = parse_policy("chelsea:keep=0.08,chunk=64,window=0.1875,recall=384")
    assert [spec.engine_args(n)["chelsea_recent_chunks"] for n in (2048, 4096, 8160)] == \
        [6, 12, 24]
    assert parse_policy("chelsea:keep=0.1,window=0.01").engine_args(2048)[
        "chelsea_recent_chunks"] == 1
    assert parse_policy("chelsea:keep=0.1,chunk=64,recent=3").engine_args(8160)[
        "chelsea_recent_chunks"] == 3
    with pytest.raises(ValueError, match="not both"):
        parse_policy("chelsea:keep=0.1,recent=3,window=0.2").engine_args(4096)
