"""ServerArgs built from flags and from Engine keywords: types and unknown names are
refused with the field named (keywords are not parsed like flags)."""

from __future__ import annotations

import dataclasses

import pytest

from sglang_chelsea.server_args import ServerArgs, prepare_server_args


@pytest.mark.parametrize("kwargs,message", [
    ({"chelsea_chunk_size": "32"}, "chelsea_chunk_size must be an int, got '32'"),
    ({"disable_radix_cache": 1}, "disable_radix_cache must be a bool, got 1"),
    ({"port": 30000.0}, "port must be an int"),
    ({"chelsea_keep_ratio": "0.5"}, "chelsea_keep_ratio must be a float"),
    ({"max_total_tokens": "1024"}, "max_total_tokens must be None or an int"),
    ({"chat_template": 3}, "chat_template must be None or a str"),
    ({"reasoning_parser": "o1"}, "unknown reasoning parser 'o1'"),
    ({"tool_call_parser": "gpt"}, "tool_call_parser must be one of"),
    ({"chelsea_representative": "median"}, "chelsea_representative must be mean or medoid"),
    ({"chelsea_representative": "medoid", "chelsea_query_weighting": True},
     "does not apply to --chelsea-representative medoid"),
])
def test_keyword_types_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerArgs.from_kwargs(device="cpu", **kwargs)


def test_ints_are_floats_and_none_is_optional() -> None:
    args = ServerArgs.from_kwargs(device="cpu", chelsea_keep_ratio=1, max_total_tokens=None)
    assert args.chelsea_keep_ratio == 1 and args.max_total_tokens is None
    with pytest.raises(TypeError, match="unknown ServerArgs field"):
        ServerArgs.from_kwargs(device="cpu", chelsea_keep=0.5)


def test_every_flag_gives_its_declared_type() -> None:
    """Parsing the command line builds each field with its declared type (checked again in
    ServerArgs), e.g. floats for ratios and ints for sizes."""
    args = prepare_server_args([
        "--device", "cpu", "--kv-compression", "chelsea", "--chelsea-keep-ratio", "0.25",
        "--chelsea-chunk-size", "256", "--max-total-tokens", "4096", "--port", "31000",
        "--tool-call-parser", "llama3", "--reasoning-parser", "deepseek-r1",
        "--disable-radix-cache"])
    assert (args.chelsea_keep_ratio, args.chelsea_chunk_size, args.max_total_tokens,
            args.port, args.tool_call_parser, args.reasoning_parser,
            args.disable_radix_cache) == (0.25, 256, 4096, 31000, "llama3", "deepseek-r1", True)
    defaults = ServerArgs(device="cpu")
    for f in dataclasses.fields(ServerArgs):  # the defaults pass the same check
        assert getattr(defaults, f.name) is not None or str(f.type).startswith("Optional[")


def test_page_size_conflicting_with_a_kv_policy_is_named() -> None:
    # With a KV policy the radix page is its chunk; --page-size used to be ignored silently.
    with pytest.raises(ValueError, match=r"--chelsea-chunk-size, 128 tokens\); --page-size 64 conflicts"):
        ServerArgs.from_kwargs(device="cpu", kv_compression="clusterkv", page_size=64,
                               clusterkv_window=64)
    args = ServerArgs.from_kwargs(device="cpu", kv_compression="clusterkv", page_size=64,
                                  chelsea_chunk_size=64, clusterkv_window=64)
    assert args.effective_page_size == 64


def test_a_bad_flag_combination_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    """The launcher reports a value ServerArgs refuses as argparse does a bad flag: the
    message on stderr and exit status 2, no traceback."""
    with pytest.raises(SystemExit) as exc:
        prepare_server_args(["--kv-compression", "chelsea", "--chelsea-keep-ratio", "2"])
    assert exc.value.code == 2
    assert "error: chelsea_keep_ratio must be in (0, 1]" in capsys.readouterr().err
