"""Structured output and tool calling for the OpenAI endpoints: request fields -> the grammar a request
decodes under, and a chat reply's text -> `content` / `reasoning_content` / `tool_calls`.

    response_format   {"type": "json_object"} | {"type": "json_schema", "json_schema": {"schema": ...}} | {"type": "text"}
    guided_json, guided_regex, guided_choice, guided_grammar     vLLM's extensions
    tool_choice       "required" / a named function: a grammar (tool_parsers.forced_tool_choice_guided)

At most one of them may constrain a request (a 400 names the ones given).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trtc.runtime.sampling_params import GuidedDecodingParams
from trtc.serve.reasoning_parsers import ReasoningStream, reasoning_stream
from trtc.serve.tool_parsers import (
    ToolCall,
    ToolCallStream,
    forced_tool_choice_guided,
    parse_forced_tool_calls,
    tool_call_stream,
)


def guided_decoding_of(req, tools: list | None = None, tool_choice=None,
                       parallel_tool_calls: bool = True) -> GuidedDecodingParams | None:
    """The request's one constraint, or None. Raises ValueError naming a bad or doubled field. A forced
    tool_choice with a response_format (as agent frameworks send on every turn) is the forced call's
    grammar: the reply is the call, with no text for the format to shape (OpenAI's behaviour)."""
    given: dict[str, GuidedDecodingParams] = {}
    rf = getattr(req, "response_format", None)
    if rf is not None:
        kind = rf.get("type") if isinstance(rf, dict) else None
        if kind == "json_object":
            given["response_format"] = GuidedDecodingParams(json_object=True)
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            schema = spec.get("schema", spec.get("json_schema")) if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise ValueError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
            given["response_format"] = GuidedDecodingParams(json=schema)
        elif kind != "text":
            raise ValueError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):
        value = getattr(req, name, None)
        if value is not None:
            given[name] = GuidedDecodingParams(**{key: value})
    forced = forced_tool_choice_guided(tools or [], tool_choice, parallel_tool_calls) if tools is not None or tool_choice is not None else None
    if forced is not None:
        given.pop("response_format", None)
        given["tool_choice"] = forced
    if len(given) > 1:
        raise ValueError(f"give at most one of response_format, guided_json, guided_regex, guided_choice, guided_grammar "
                         f"and a forced tool_choice; got {', '.join(given)}")
    return next(iter(given.values()), None)


@dataclass
class ChatReplyParser:
    """One choice's reply, streamed (feed/finish: the deltas) or whole (message)."""

    reasoning_parser: str | None = None
    tool_parser: str | None = None  # parses calls when tools are offered with tool_choice "auto"
    tool_choice: object = None  # "required" / named: the reply is the forced calls' JSON
    forced: bool = False
    calls: list[ToolCall] = field(default_factory=list)
    _reasoning: ReasoningStream | None = None
    _tools: ToolCallStream | None = None
    _text: str = ""

    def __post_init__(self) -> None:
        self._reasoning = reasoning_stream(self.reasoning_parser) if self.reasoning_parser else None
        self._tools = tool_call_stream(self.tool_parser) if self.tool_parser and not self.forced else None

    def feed(self, text: str) -> dict:
        return self._step(text, final=False)

    def finish(self) -> dict:
        return self._step("", final=True)

    def message(self, text: str) -> dict:
        """The whole reply as a chat message (the streamed deltas merged)."""
        a, b = self.feed(text), self.finish()
        msg: dict = {"role": "assistant", "content": (a.get("content", "") + b.get("content", "")) or None}
        reasoning = a.get("reasoning_content", "") + b.get("reasoning_content", "")
        if reasoning:
            msg["reasoning_content"] = reasoning
        if self.calls:
            msg["tool_calls"] = [tool_call_json(c) for c in self.calls]
        elif msg["content"] is None:
            msg["content"] = ""
        return msg

    def _step(self, text: str, final: bool) -> dict:
        delta: dict = {}
        if self._reasoning is not None:
            r = self._reasoning.finish() if final else self._reasoning.feed(text)
            if r.reasoning_content:
                delta["reasoning_content"] = r.reasoning_content
            text = r.content
        if self.forced:  # the reply is JSON for the calls: read when it is complete
            self._text += text
            if final:
                self.calls = parse_forced_tool_calls(self.tool_choice, self._text)
                if self.calls:
                    delta["tool_calls"] = [{"index": i, **tool_call_json(c)} for i, c in enumerate(self.calls)]
                elif self._text:
                    delta["content"] = self._text  # cut short: the text as it is
            return delta
        if self._tools is not None:
            d = self._tools.finish() if final else self._tools.feed(text)
            text = d.content
            if d.tool_calls:
                delta["tool_calls"] = [{"index": t.index, "id": t.id, "type": "function",
                                        "function": {"name": t.name, "arguments": t.arguments}} for t in d.tool_calls]
                self.calls = list(self._tools.calls)
        if text:
            delta["content"] = text
        return delta


def tool_call_json(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
