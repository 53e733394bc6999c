"""A chat choice's output split into reasoning, content and tool calls, whole or streamed:
the reasoning parser runs first, the tool-call parser on the content it leaves."""

from __future__ import annotations

from typing import Optional

from sglang_chelsea.entrypoints.reasoning import ReasoningStream, split_reasoning
from sglang_chelsea.entrypoints.tool_calls import (
    ToolCall,
    ToolCallStream,
    ToolMode,
    split_tool_calls,
)


def split_chat_output(text: str, reasoning_parser: Optional[str], tools: ToolMode
                      ) -> tuple[Optional[str], str, list[ToolCall]]:
    """``(reasoning_content or None, content, tool calls)`` of a whole output."""
    reasoning, rest = split_reasoning(text, reasoning_parser)
    content, calls = split_tool_calls(rest, tools)
    return reasoning, content, calls


class ChatOutputStream:
    """The streamed counterpart of :func:`split_chat_output` for one choice."""

    def __init__(self, reasoning_parser: Optional[str], tools: ToolMode) -> None:
        self.reasoning = ReasoningStream(reasoning_parser)
        self.tools = ToolCallStream(tools)

    def feed(self, delta: str) -> tuple[str, str]:
        """``(reasoning, content)`` that can be sent now."""
        reasoning, content = self.reasoning.feed(delta)
        return reasoning, self.tools.feed(content)

    def finish(self) -> tuple[str, str, list[ToolCall]]:
        """``(reasoning, content, calls)`` not yet sent, once the output is complete."""
        reasoning, content = self.reasoning.finish()
        content = self.tools.feed(content)
        rest, calls = self.tools.finish()
        return reasoning, content + rest, calls
