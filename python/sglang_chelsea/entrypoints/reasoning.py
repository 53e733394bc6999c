"""Reasoning content for ``/v1/chat/completions``: ``--reasoning-parser``, as SGLang serves it.

A reasoning model writes its chain of thought between ``<think>`` and ``</think>`` before
the answer. With a parser, that part is returned as ``message.reasoning_content`` (streamed
as ``delta.reasoning_content``) and the rest as ``content``; a request's
``separate_reasoning: false`` keeps it all in ``content``.

Parsers: ``qwen3`` (the reasoning starts with ``<think>``: Qwen3 with thinking on; with
``enable_thinking: false`` its template closes the thinking in the prompt and the output is
all content), ``deepseek-r1`` and ``qwen3-thinking`` (the prompt already opened the thinking:
the output is reasoning up to ``</think>``, with or without a ``<think>`` of its own).
An output cut short before ``</think>`` is all reasoning.
"""

from __future__ import annotations

from typing import Optional

from sglang_chelsea.entrypoints.tool_calls import partial_marker

THINK_START, THINK_END = "<think>", "</think>"
# parser name -> whether the output starts inside the reasoning (no <think> needed)
REASONING_PARSERS = {"deepseek-r1": True, "qwen3": False, "qwen3-thinking": True}


def check_reasoning_parser(name: Optional[str]) -> None:
    """ValueError unless ``name`` is None or a known parser."""
    if name is not None and name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r} (one of "
                         f"{sorted(REASONING_PARSERS)})")


class ReasoningStream:
    """Splits an output, piece by piece, into reasoning and content.

    :meth:`feed` returns ``(reasoning, content)`` that can be sent now; text that may still
    be the start of a ``<think>`` or ``</think>`` marker is held back until the next piece
    (or :meth:`finish`) decides it.
    """

    def __init__(self, parser: Optional[str]) -> None:
        check_reasoning_parser(parser)
        self.forced = REASONING_PARSERS.get(parser, False)
        self.state = "start" if parser is not None else "content"
        self.held = ""
        self.reasoned = False  # whether the output had a reasoning part

    def feed(self, delta: str) -> tuple[str, str]:
        self.held += delta
        reasoning = content = ""
        if self.state == "start":
            head = self.held.lstrip()
            if head.startswith(THINK_START):
                self.state, self.held = "reasoning", head[len(THINK_START):]
            elif not head or THINK_START.startswith(head):
                return "", ""  # still undecided
            else:
                self.state = "reasoning" if self.forced else "content"
        if self.state == "reasoning":
            self.reasoned = True
            end = self.held.find(THINK_END)
            if end < 0:
                keep = partial_marker(self.held, THINK_END)
                reasoning, self.held = self.held[:len(self.held) - keep], \
                    self.held[len(self.held) - keep:]
                return reasoning, ""
            reasoning = self.held[:end]
            self.held = self.held[end + len(THINK_END):].lstrip()
            self.state = "answer_start"
        if self.state == "answer_start":  # drop the whitespace between </think> and answer
            self.held = self.held.lstrip()
            if not self.held:
                return reasoning, ""
            self.state = "content"
        content, self.held = self.held, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The held text once the output is complete, as ``(reasoning, content)``."""
        held, self.held = self.held, ""
        if self.state == "reasoning" or (self.state == "start" and self.forced and held.strip()):
            self.reasoned = True
            return held, ""
        if self.state == "answer_start":
            return "", ""
        return "", held


def split_reasoning(text: str, parser: Optional[str]) -> tuple[Optional[str], str]:
    """``(reasoning_content, content)`` of a whole output (reasoning None without any)."""
    stream = ReasoningStream(parser)
    reasoning, content = stream.feed(text)
    more_reasoning, more_content = stream.finish()
    reasoning += more_reasoning
    content += more_content
    return (reasoning.strip() if stream.reasoned else None), content
