"""Function calling for ``/v1/chat/completions``: ``tools``, ``tool_choice`` and
``--tool-call-parser``, as SGLang serves them.

- ``tool_choice: "none"``: the tools are neither shown to the chat template nor parsed.
- ``"auto"`` (the default when tools are given): the tools go to the chat template; with a
  ``--tool-call-parser``, the calls the model writes in its own format are taken out of the
  text into ``message.tool_calls`` (without one, the text is returned as it is).
- ``"required"`` or a named function: the output is constrained to a JSON array of
  ``{"name", "parameters"}`` objects that follow the tools' parameter schemas (the JSON
  schema SGLang uses), and that array becomes the tool calls, whatever the parser.

Parsers (model formats): ``qwen25`` / ``hermes`` (``<tool_call>{json}</tool_call>``),
``llama3`` (``<|python_tag|>`` or a leading ``{"name": ..., "parameters": ...}``, several
separated by ``;``), ``mistral`` (``[TOOL_CALLS] [{...}, ...]``).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional

_DECODER = json.JSONDecoder()


@dataclass
class ToolCall:
    """One parsed call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str

    def to_openai(self, index: Optional[int] = None) -> dict[str, Any]:
        """The OpenAI ``tool_calls`` entry (with ``index`` in a stream delta)."""
        call: dict[str, Any] = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def _call_of(obj: Any) -> Optional[ToolCall]:
    """A ToolCall from ``{"name", "arguments" | "parameters"}``; None for anything else."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except (json.JSONDecodeError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_values(text: str, separators: str = "") -> Optional[list[Any]]:
    """Every JSON value in ``text``, separated by whitespace or ``separators``; None if any
    of it is not JSON."""
    values, i = [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] in separators):
            i += 1
        if i == len(text):
            return values
        try:
            value, i = _DECODER.raw_decode(text, i)
        except (json.JSONDecodeError, RecursionError):  # not JSON, or nested too deeply
            return None
        values.append(value)


def _calls_of(values: Optional[list[Any]]) -> list[ToolCall]:
    """Calls from JSON values (lists are flattened); [] unless every value is a call."""
    if not values:
        return []
    flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
    calls = [_call_of(v) for v in flat]
    return [c for c in calls if c is not None] if flat and None not in calls else []


def partial_marker(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that is a proper beginning of ``marker``
    (text a stream must hold back until the next piece decides it)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """Finds a model's tool calls in its output text.

    Subclasses give ``markers`` (texts that open the calls anywhere in the output) and
    ``leading`` (texts that open them only at the start), and :meth:`parse_calls`.
    """

    markers: tuple[str, ...] = ()
    leading: tuple[str, ...] = ()

    def find_start(self, text: str, since: int = 0) -> int:
        """Where the calls begin in ``text``, or -1; none begins before ``since`` (a
        stream's text already sent as content, where no marker started)."""
        found = [i for i in (text.find(m, since) for m in self.markers) if i >= 0]
        if since == 0 and any(text.lstrip().startswith(m) for m in self.leading):
            found.append(0)  # the whitespace before a leading call is part of it
        return min(found, default=-1)

    def undecided(self, text: str, since: int = 0) -> int:
        """How many characters at the end of ``text`` may still become a marker (to hold
        back from a stream that has sent ``text[:since]``)."""
        held = max((partial_marker(text, m) for m in self.markers), default=0)
        if since == 0 and self.leading and not text.strip():
            held = len(text)  # only whitespace so far: a leading call may still follow
        return held

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """``(content, calls)``: the text before the calls and the calls; ``(text, [])``
        when ``text`` holds no well-formed call."""
        start = self.find_start(text)
        if start < 0:
            return text, []
        calls = self.parse_calls(text[start:])
        return (text[:start].rstrip(), calls) if calls else (text, [])

    def parse_calls(self, text: str) -> list[ToolCall]:
        raise NotImplementedError


class HermesParser(ToolCallParser):
    """``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (Qwen2.5, Hermes)."""

    markers = ("<tool_call>",)
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def parse_calls(self, text: str) -> list[ToolCall]:
        blocks = self._BLOCK.findall(text)
        calls = [_calls_of(_json_values(b)) for b in blocks]
        return [c for cs in calls for c in cs] if all(calls) else []


class Llama3Parser(ToolCallParser):
    """``<|python_tag|>{"name": ..., "parameters": {...}}; {...}`` or the JSON alone at the
    start of the output (Llama 3.1-3.3)."""

    markers = ("<|python_tag|>",)
    leading = ("{",)

    def parse_calls(self, text: str) -> list[ToolCall]:
        text = text.replace("<|python_tag|>", "", 1)
        return _calls_of(_json_values(text, separators=";"))


class MistralParser(ToolCallParser):
    """``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`` (Mistral); with the
    special token skipped, the JSON array alone at the start of the output."""

    markers = ("[TOOL_CALLS]",)
    leading = ("[{",)

    def parse_calls(self, text: str) -> list[ToolCall]:
        return _calls_of(_json_values(text.replace("[TOOL_CALLS]", "", 1)))


TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {
    "qwen25": HermesParser, "hermes": HermesParser, "llama3": Llama3Parser,
    "mistral": MistralParser,
}


def make_parser(name: Optional[str]) -> Optional[ToolCallParser]:
    """The parser named by ``--tool-call-parser`` (None for none)."""
    if name is None:
        return None
    if name not in TOOL_CALL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r} (one of {sorted(TOOL_CALL_PARSERS)})")
    return TOOL_CALL_PARSERS[name]()


# ---------------------------------------------------------------------- tool_choice
def check_tools(tools: list[dict[str, Any]], tool_choice: Any) -> Optional[str]:
    """Validate ``tools`` and ``tool_choice``; return the named function, if one is forced.

    Raises ValueError naming the problem.
    """
    names = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                             "{\"name\": ..., \"parameters\": {...}}}")
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict)
                                   or params.get("type", "object") != "object"):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema of an "
                             "object (the call's named arguments)")
        names.append(fn["name"])
    if tool_choice in (None, "none", "auto", "required"):
        if tool_choice == "required" and not tools:
            raise ValueError('tool_choice "required" needs tools')
        return None
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
            or tool_choice.get("type", "function") != "function":
        raise ValueError('tool_choice must be "none", "auto", "required" or '
                         '{"type": "function", "function": {"name": ...}}')
    if fn["name"] not in names:
        raise ValueError(f"tool_choice names function {fn['name']!r}, which is not in tools")
    return fn["name"]


def _tool_schema(fn: dict[str, Any]) -> dict[str, Any]:
    """One call of ``fn``: its name and its parameters (without their ``$defs``, which
    :func:`forced_calls_schema` lifts to the root, where their ``$ref``s point)."""
    params = {k: v for k, v in (fn.get("parameters") or {"type": "object", "properties": {}}
                                ).items() if k not in ("$defs", "definitions")}
    return {"type": "object",
            "properties": {"name": {"type": "string", "enum": [fn["name"]]},
                           "parameters": params},
            "required": ["name", "parameters"], "additionalProperties": False}


def forced_calls_schema(tools: list[dict[str, Any]], name: Optional[str], single: bool = False
                        ) -> dict[str, Any]:
    """The JSON schema of the output under ``tool_choice`` "required" (``name`` None) or a
    named function: an array of one or more ``{"name", "parameters"}`` calls (one when
    ``name`` is given or ``single``: ``parallel_tool_calls`` false).

    The tools' ``$defs`` (and ``definitions``) move to the root, so their local ``$ref``s
    still resolve; two tools defining one name differently are a ValueError.
    """
    fns = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    items = _tool_schema(fns[0]) if len(fns) == 1 else {"anyOf": [_tool_schema(f) for f in fns]}
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": items}
    if name is not None or single:
        schema["maxItems"] = 1
    for key in ("$defs", "definitions"):
        merged: dict[str, Any] = {}
        for fn in fns:
            for def_name, definition in ((fn.get("parameters") or {}).get(key) or {}).items():
                if merged.setdefault(def_name, definition) != definition:
                    raise ValueError(f"tools define {key}/{def_name} differently; "
                                     "a forced tool choice needs one definition per name")
        if merged:
            schema[key] = merged
    return schema


@dataclass(frozen=True)
class ToolMode:
    """How a request's output holds tool calls: ``forced`` (tool_choice required or named:
    the output is the JSON array of calls), else found by ``parser`` (none without one).
    Calls of functions not in ``names`` (the request's tools) are dropped, as SGLang does."""

    parser: Optional[ToolCallParser] = None
    forced: bool = False
    names: frozenset[str] = frozenset()


def split_tool_calls(text: str, mode: ToolMode) -> tuple[str, list[ToolCall]]:
    """``(content, calls)`` of a whole output. Without a well-formed call of one of the
    request's functions, the content is the whole text."""
    if mode.forced:
        content, calls = "", _calls_of(_json_values(text))
    elif mode.parser is not None:
        content, calls = mode.parser.parse(text)
    else:
        return text, []
    calls = [c for c in calls if c.name in mode.names]
    return (content, calls) if calls else (text, [])


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a chat template: an assistant's ``tool_calls`` arguments as objects
    (templates write them with ``tojson``), as SGLang passes them."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            message = dict(message, tool_calls=[_with_object_arguments(c) for c in calls])
        out.append(message)
    return out


def _with_object_arguments(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        arguments = json.loads(fn["arguments"])
    except (json.JSONDecodeError, RecursionError):
        return call
    return dict(call, function=dict(fn, arguments=arguments))


class ToolCallStream:
    """Splits a streamed output into content to send now and tool calls at the end.

    Content flows until the calls begin (a marker's possible beginning is held back); from
    there the text is kept, and :meth:`finish` parses it: its calls, or, when it holds no
    well-formed call, the kept text as content. With a forced mode (``tool_choice`` required
    or named) the whole output is kept.
    """

    def __init__(self, mode: ToolMode) -> None:
        self.mode = mode
        self.parser = mode.parser
        self.text = ""
        self.sent = 0
        self.holding = mode.forced

    def feed(self, delta: str) -> str:
        """Add new output text; return the content that can be sent now."""
        self.text += delta
        if self.holding:
            return ""
        if self.parser is None:
            self.sent = len(self.text)
            return delta
        # Only the unsent text is scanned: no marker begins in what was already sent.
        start = self.parser.find_start(self.text, self.sent)
        if start >= 0:
            self.holding = True
            end = start
        else:
            end = len(self.text) - self.parser.undecided(self.text, self.sent)
        # Trailing whitespace waits too: before a call it is not content (as in
        # split_tool_calls), before more text it is sent with that text.
        out = self.text[self.sent:end].rstrip()
        self.sent += len(out)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """``(content not yet sent, calls)`` once the output is complete."""
        content, calls = split_tool_calls(self.text, self.mode)
        if calls:
            return content[self.sent:], calls
        return self.text[self.sent:], []
