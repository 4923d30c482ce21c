"""Tool-call parsers: a model's generated text -> OpenAI `tool_calls` (vLLM's `--tool-call-parser` names).

    hermes        Hermes / Qwen 2.5 / Qwen 3: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
                  blocks, after optional content
    llama3_json   Llama 3.1 / 3.2 / 3.3 JSON tool calls: the output is `{"name": ..., "parameters": {...}}`
                  (optionally after `<|python_tag|>`), several joined by `;`

Streaming and non-streaming are one code path: `parse(text)` feeds the whole text to the parser's
stream, so a streamed reply's deltas add up to the non-streamed reply. Content is streamed as it comes
(only a suffix that may be the start of a tool-call marker is held back); a tool call comes out as one
`delta.tool_calls` entry (id, name, the whole arguments JSON) once it is complete. A call that does not
parse (bad JSON, no name, arguments that are not an object) is returned as content text, never an error.

`required` and named `tool_choice` do not rely on these: the server constrains the output with a grammar
(`forced_tool_choice_guided`) and reads the calls with `parse_forced_tool_calls`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from trtc.runtime.sampling_params import GuidedDecodingParams
from trtc.serve.text_stream import held_back


def make_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of an object
    id: str = field(default_factory=make_tool_call_id)


@dataclass
class DeltaToolCall:
    """One `delta.tool_calls[]` entry: a complete call, or (forced named calls) an arguments fragment."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class Delta:
    content: str = ""
    tool_calls: list[DeltaToolCall] = field(default_factory=list)


@dataclass
class ParsedReply:
    content: str | None  # None when the reply is only tool calls
    tool_calls: list[ToolCall]


def _call_from_json(obj, argument_keys: tuple[str, ...]) -> ToolCall | None:
    """{"name": str, <argument key>: object or its JSON text} -> ToolCall; None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in argument_keys if k in obj), {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolCallStream:
    """Incremental parse of one reply: feed() each text delta, finish() at the end of the output."""

    def __init__(self) -> None:
        self.buffer = ""  # text not yet emitted
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> Delta:
        self.buffer += text
        return self._drain(final=False)

    def finish(self) -> Delta:
        return self._drain(final=True)

    def _emit(self, delta: Delta, call: ToolCall) -> None:
        delta.tool_calls.append(DeltaToolCall(len(self.calls), call.id, call.name, call.arguments))
        self.calls.append(call)

    def _drain(self, final: bool) -> Delta:
        raise NotImplementedError


class HermesStream(ToolCallStream):
    START, END = "<tool_call>", "</tool_call>"

    def _drain(self, final: bool) -> Delta:
        delta = Delta()
        while self.buffer:
            start = self.buffer.find(self.START)
            if start < 0:  # content, holding back what may be the start of a marker
                keep = 0 if final else held_back(self.buffer, self.START)
                delta.content += self._content(self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep :]
                break
            delta.content += self._content(self.buffer[:start])
            self.buffer = self.buffer[start:]
            end = self.buffer.find(self.END)
            if end < 0 and not final:
                break  # the call is still being generated
            body = self.buffer[len(self.START) : end if end >= 0 else len(self.buffer)]
            block = self.buffer[: end + len(self.END)] if end >= 0 else self.buffer
            self.buffer = self.buffer[len(block) :]
            try:
                call = _call_from_json(json.loads(body), ("arguments", "parameters"))
            except ValueError:
                call = None
            if call is None:
                delta.content += block  # malformed: the model's text as it is
            else:
                self._emit(delta, call)
        return delta

    def _content(self, text: str) -> str:
        # between and after calls the model writes newlines; they are not content
        return text if not self.calls or text.strip() else ""


class Llama3JsonStream(ToolCallStream):
    PYTHON_TAG = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self.mode: str | None = None  # None: undecided; "content"; "calls"
        self._decoder = json.JSONDecoder()

    def _drain(self, final: bool) -> Delta:
        delta = Delta()
        if self.mode is None:
            head = self.buffer.lstrip()
            if head.startswith((self.PYTHON_TAG, "{")):
                self.mode = "calls"
            elif final or (head and not self.PYTHON_TAG.startswith(head)):
                self.mode = "content"
            else:
                return delta  # only whitespace, or the start of <|python_tag|>, so far
        if self.mode == "content":
            delta.content, self.buffer = self.buffer, ""
            return delta
        while True:  # calls: JSON objects separated by ';' (and whitespace)
            text = self.buffer.lstrip()
            if text.startswith(self.PYTHON_TAG):
                text = text[len(self.PYTHON_TAG) :].lstrip()
            text = text.lstrip("; \n\t")
            if not text:
                self.buffer = ""
                break
            try:
                obj, end = self._decoder.raw_decode(text)
            except ValueError:
                if final:  # never completed, or not JSON: the rest is content
                    delta.content += self.buffer
                    self.buffer = ""
                break
            call = _call_from_json(obj, ("parameters", "arguments"))
            if call is None:  # JSON that is not a call: the rest of the reply is content
                self.mode = "content"
                delta.content, self.buffer = delta.content + self.buffer, ""
                break
            self._emit(delta, call)
            self.buffer = text[end:]
        return delta


TOOL_PARSERS: dict[str, type[ToolCallStream]] = {"hermes": HermesStream, "llama3_json": Llama3JsonStream}


def tool_call_stream(parser: str) -> ToolCallStream:
    if parser not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {parser!r}; choose one of {', '.join(TOOL_PARSERS)}")
    return TOOL_PARSERS[parser]()


def parse_tool_calls(parser: str, text: str) -> ParsedReply:
    """The whole reply at once (the same parse as the stream's)."""
    stream = tool_call_stream(parser)
    d1, d2 = stream.feed(text), stream.finish()
    content = d1.content + d2.content
    return ParsedReply(content if content.strip() or not stream.calls else None, stream.calls)


# Forced tool calls (tool_choice "required" or a named function) ------------------------------------
def _function(tool: dict) -> dict:
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(f"each tool needs a function with a name, got {tool!r}")
    return fn


def _named(tool_choice) -> str | None:
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function") or {}
        if not isinstance(fn.get("name"), str):
            raise ValueError(f"tool_choice must name a function: {{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}")
        return fn["name"]
    return None


MAX_PARALLEL_TOOL_CALLS = 4  # tool_choice "required": the array of calls closes after this many at most


def forced_tool_choice_guided(tools: Sequence[dict], tool_choice,
                              parallel_tool_calls: bool = True) -> GuidedDecodingParams | None:
    """The grammar that makes the model call a tool: a named function -> its parameters' JSON object;
    "required" -> a JSON array of 1 to MAX_PARALLEL_TOOL_CALLS {"name", "parameters"} calls of the given
    tools (exactly one when parallel_tool_calls is false): bounded, so generation ends when the array
    closes, as a small model may otherwise repeat a call until max_tokens. None for "auto" / "none".
    Raises ValueError naming an unknown function or a bad tool_choice."""
    functions = {f["name"]: f for f in map(_function, tools or [])}
    name = _named(tool_choice)
    if name is not None:
        if name not in functions:
            raise ValueError(f"tool_choice names function {name!r}, which is not in tools ({', '.join(functions) or 'none given'})")
        return GuidedDecodingParams(json=functions[name].get("parameters") or {"type": "object"})
    if tool_choice == "required":
        if not functions:
            raise ValueError("tool_choice 'required' needs at least one tool in tools")
        calls = [{"type": "object", "properties": {"name": {"const": n}, "parameters": f.get("parameters") or {"type": "object"}},
                  "required": ["name", "parameters"]} for n, f in functions.items()]
        most = MAX_PARALLEL_TOOL_CALLS if parallel_tool_calls else 1
        return GuidedDecodingParams(json={"type": "array", "minItems": 1, "maxItems": most, "items": {"anyOf": calls}})
    if tool_choice in (None, "auto", "none"):
        return None
    raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or a named function, got {tool_choice!r}")


def parse_forced_tool_calls(tool_choice, text: str) -> list[ToolCall]:
    """The calls in a reply made under forced_tool_choice_guided's grammar (empty if it was cut short)."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    name = _named(tool_choice)
    if name is not None:
        return [ToolCall(name, json.dumps(value, ensure_ascii=False))] if isinstance(value, dict) else []
    items = value if isinstance(value, list) else []
    calls = [_call_from_json(c, ("parameters",)) for c in items]
    return [c for c in calls if c is not None]
