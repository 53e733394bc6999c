"""Reasoning content split from the answer, whole and streamed, for each parser."""

from __future__ import annotations

from typing import Optional

import pytest

from sglang_chelsea.entrypoints.reasoning import ReasoningStream, split_reasoning


@pytest.mark.parametrize("parser,text,expected", [
    ("qwen3", "<think>\nAdd them.\n</think>\n\nIt is 4.", ("Add them.", "It is 4.")),
    ("qwen3", "It is 4.", (None, "It is 4.")),  # thinking off: no <think>
    ("qwen3", "  <think>cut short", ("cut short", "")),  # length before </think>
    ("deepseek-r1", "Add them.</think>It is 4.", ("Add them.", "It is 4.")),
    ("deepseek-r1", "<think>Add them.</think>It is 4.", ("Add them.", "It is 4.")),
    ("qwen3-thinking", "no end tag", ("no end tag", "")),
    ("qwen3", "<think></think>Hi", ("", "Hi")),
    ("qwen3", "I <think> mid-text is content", (None, "I <think> mid-text is content")),
    (None, "<think>kept</think>as is", (None, "<think>kept</think>as is")),
])
def test_split(parser: Optional[str], text: str, expected: tuple) -> None:
    assert split_reasoning(text, parser) == expected


@pytest.mark.parametrize("step", [1, 2, 5, 100])
@pytest.mark.parametrize("parser,text", [
    ("qwen3", "<think>\nAdd them: 2 + 2.\n</think>\n\nIt is <b>4</b>."),
    ("deepseek-r1", "Add </thi them.</think> It is 4."),
    ("qwen3", "<thin is not a tag"),
    ("qwen3-thinking", "all thought </thin"),
])
def test_stream_matches_the_whole_split(parser: str, text: str, step: int) -> None:
    """Streamed in pieces of any size, the reasoning and content add up to the whole
    split (the reasoning unstripped), and no marker leaks into either."""
    stream = ReasoningStream(parser)
    reasoning = content = ""
    for i in range(0, len(text), step):
        r, c = stream.feed(text[i:i + step])
        reasoning, content = reasoning + r, content + c
    r, c = stream.finish()
    reasoning, content = reasoning + r, content + c
    whole_reasoning, whole_content = split_reasoning(text, parser)
    assert (reasoning.strip() or None, content) == \
        (whole_reasoning or None, whole_content)
    assert "<think>" not in reasoning and "</think>" not in reasoning + content


def test_unknown_parser() -> None:
    with pytest.raises(ValueError, match="unknown reasoning parser 'r2'"):
        ReasoningStream("r2")
