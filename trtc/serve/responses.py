"""The Responses API, POST /v1/responses: a request is translated into a chat completion (the same chat
template, sampling, grammar, reasoning and tool-call parsers), and its reply into output items.

    input                 text, or items: messages (input_text / output_text parts), function_call,
                          function_call_output (a tool's result), reasoning (dropped, as chat drops it)
    instructions          a system message before the input
    max_output_tokens, temperature, top_p, tools (function), tool_choice, parallel_tool_calls
    text.format           text | json_object | json_schema: the grammar, as chat's response_format
    reasoning.effort      passed to the chat template, as chat's reasoning_effort
    output                reasoning item (--reasoning_parser), message item (output_text), function_call items
    stream                OpenAI's events, each with its sequence_number: response.created, response.in_progress,
                          response.output_item.added, response.content_part.added, response.output_text.delta, ...,
                          response.output_text.done, response.content_part.done, response.output_item.done,
                          response.completed (response.incomplete when max_output_tokens cut it short)

Responses are not stored (`store` is false on this server): `previous_response_id` is a 400 naming it
(trtc/serve/fields.py); send the whole conversation in `input`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trtc.errors import TrtcError
from trtc.serve.chat import render_chat
from trtc.serve.completions import Choice, _check_tools, _record, _submit, _watch_disconnect, openai_finish_reason
from trtc.serve.errors import APIError, parse_body
from trtc.serve.fields import check_fields
from trtc.serve.protocol import ChatCompletionRequest
from trtc.serve.structured import ChatReplyParser
from trtc.serve.tool_parsers import ToolCall

TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # undeclared fields: sorted by trtc/serve/fields.py

    model: str | None = None
    input: str | list[dict]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stream: bool = False
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool = True
    text: dict | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", "name", "schema"}}
    reasoning: dict | None = None  # {"effort": ...}: passed to the chat template


def _text_of(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of text parts", where)
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}: content part of type {kind!r} is not supported; send input_text parts", where)
        texts.append(part["text"])
    return "".join(texts)


def chat_messages(req: ResponsesRequest) -> list[dict]:
    """`instructions` and `input` as chat messages; a 400 naming an item trtc cannot take."""
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    items = [{"type": "message", "role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    if not items:
        raise APIError(400, "input must not be empty", "input")
    for i, item in enumerate(items):
        where, kind = f"input[{i}]", item.get("type", "message")
        try:
            if kind == "message":
                messages.append({"role": item["role"], "content": _text_of(item.get("content"), where)})
            elif kind == "function_call":
                call = {"id": item["call_id"], "type": "function",
                        "function": {"name": item["name"], "arguments": item["arguments"]}}
                if messages and messages[-1]["role"] == "assistant":  # the same turn: its text, then its calls
                    messages[-1].setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                output = item["output"]
                messages.append({"role": "tool", "tool_call_id": item["call_id"],
                                 "content": output if isinstance(output, str) else _text_of(output, where)})
            elif kind != "reasoning":  # earlier reasoning is not shown to the model again, as in chat
                raise APIError(400, f"{where}: input items of type {kind!r} are not supported; send message, "
                                    "function_call, function_call_output or reasoning items", where)
        except KeyError as e:
            raise APIError(400, f"{where}: a {kind} item needs {e.args[0]!r}", where) from None
    return messages


def _chat_tools(tools: list[dict] | None) -> list[dict] | None:
    out = []
    for i, tool in enumerate(tools or []):
        if tool.get("type") != "function":
            raise APIError(400, f"tools[{i}]: tools of type {tool.get('type')!r} are not supported; send function tools",
                           "tools")
        fn = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out or None


def _chat_tool_choice(choice):
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise APIError(400, f"tool_choice {choice!r} is not supported; send 'auto', 'none', 'required' or "
                                "{'type': 'function', 'name': ...}", "tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: dict | None) -> dict | None:
    fmt = (text or {}).get("format")
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "output"), "schema": fmt.get("schema")}}
    return {"type": fmt.get("type")}


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    body = {"model": req.model, "messages": chat_messages(req), "max_completion_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "tools": _chat_tools(req.tools),
            "tool_choice": _chat_tool_choice(req.tool_choice), "parallel_tool_calls": req.parallel_tool_calls,
            "response_format": _response_format(req.text), "reasoning_effort": (req.reasoning or {}).get("effort")}
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        raise APIError(400, f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None


class OutputItems:
    """A reply's chat deltas (ChatReplyParser's) -> output items, and the stream events that build them
    (each an event dict without its sequence_number)."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self._open: dict | None = None  # the reasoning or message item being written

    def feed(self, delta: dict) -> list[dict]:
        events = []
        for kind, key in (("reasoning", "reasoning_content"), ("message", "content")):
            if delta.get(key):
                events += self._write(kind, delta[key])
        return events

    def finish(self, calls: list[ToolCall], incomplete: bool = False) -> list[dict]:
        """The open item closes ("incomplete": cut at max_output_tokens); then the calls' items."""
        status = "incomplete" if incomplete else "completed"
        events = self._close(status)
        if not calls and not any(i["type"] == "message" for i in self.items):
            events += self._write("message", "") + self._close(status)  # an empty reply is an empty message
        for call in calls:
            item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call.id, "name": call.name,
                    "arguments": "", "status": "in_progress"}
            index = len(self.items)
            self.items.append(item)
            ref = {"item_id": item["id"], "output_index": index}
            events.append({"type": "response.output_item.added", "output_index": index, "item": dict(item)})
            events.append({"type": "response.function_call_arguments.delta", **ref, "delta": call.arguments})
            item.update(arguments=call.arguments, status="completed")
            events.append({"type": "response.function_call_arguments.done", **ref, "arguments": call.arguments,
                           "name": call.name})
            events.append({"type": "response.output_item.done", "output_index": index, "item": dict(item)})
        return events

    def _part(self, kind: str, text: str) -> dict:
        if kind == "message":
            return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "reasoning_text", "text": text}

    def _write(self, kind: str, text: str) -> list[dict]:
        events = []
        if self._open is not None and self._open["type"] != kind:
            events += self._close()
        if self._open is None:
            item = ({"type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "assistant", "content": []}
                    if kind == "message" else {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": [],
                                               "content": []})
            item.update(status="in_progress", _text="")
            self._open = item
            self.items.append(item)
            ref = self._ref()
            events.append({"type": "response.output_item.added", "output_index": ref["output_index"],
                           "item": self._public(item)})
            events.append({"type": "response.content_part.added", **ref, "content_index": 0,
                           "part": self._part(kind, "")})
        if text:
            self._open["_text"] += text
            event = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
            extra = {"logprobs": []} if kind == "message" else {}
            events.append({"type": event, **self._ref(), "content_index": 0, "delta": text, **extra})
        return events

    def _close(self, status: str = "completed") -> list[dict]:
        item = self._open
        if item is None:
            return []
        self._open = None
        kind, text, ref = item["type"], item.pop("_text"), {"item_id": item["id"], "output_index": self.items.index(item)}
        item.update(content=[self._part(kind, text)], status=status)
        done = "response.output_text.done" if kind == "message" else "response.reasoning_text.done"
        extra = {"logprobs": []} if kind == "message" else {}
        return [{"type": done, **ref, "content_index": 0, "text": text, **extra},
                {"type": "response.content_part.done", **ref, "content_index": 0, "part": self._part(kind, text)},
                {"type": "response.output_item.done", "output_index": ref["output_index"], "item": dict(item)}]

    def _ref(self) -> dict:
        return {"item_id": self._open["id"], "output_index": self.items.index(self._open)}

    @staticmethod
    def _public(item: dict) -> dict:
        return {k: v for k, v in item.items() if not k.startswith("_")}


def _usage(ctx, prompt_tokens: int, choice: Choice, items: list[dict]) -> dict:
    output = len(choice.stream.output.outputs[0].token_ids)
    reasoning = "".join(p["text"] for i in items if i["type"] == "reasoning" for p in i["content"])
    reasoning_tokens = len(ctx.llm.tokenizer(reasoning, add_special_tokens=False).input_ids) if reasoning else 0
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens, output)},
            "total_tokens": prompt_tokens + output}


def add_responses_routes(app: FastAPI, ctx, check_model) -> None:
    @app.post("/v1/responses")
    async def responses(request: Request):
        req = await parse_body(request, ResponsesRequest)
        check_model(req.model)
        check_fields(req, "responses")
        chat = chat_request(req)
        tools = _check_tools(ctx, chat)
        prompt = render_chat(ctx.llm.tokenizer, chat.messages, ctx.chat_template, True, tools, chat.template_kwargs())
        choices, prompt_tokens = await _submit(ctx, chat, [prompt], chat.requested_max_tokens(), False,
                                               max_tokens_name="max_output_tokens")
        choice = choices[0]
        choice.reply = ChatReplyParser(ctx.reasoning_parser, ctx.tool_call_parser if tools else None, chat.tool_choice,
                                       chat.forced_tool_choice)
        resp = _ResponseObject(ctx, req, f"resp_{uuid.uuid4().hex}", prompt_tokens, choice)
        if req.stream:
            return StreamingResponse(resp.events(request), media_type="text/event-stream")
        return await resp.whole(request)


class _ResponseObject:
    """One response: built whole, or streamed as events."""

    def __init__(self, ctx, req: ResponsesRequest, rid: str, prompt_tokens: int, choice: Choice) -> None:
        self.ctx, self.req, self.id, self.prompt_tokens, self.choice = ctx, req, rid, prompt_tokens, choice
        self.created = int(time.time())
        self.output = OutputItems()

    def body(self, status: str) -> dict:
        req, done = self.req, status in ("completed", "incomplete")
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "model": self.ctx.model_name, "instructions": req.instructions,
            "output": [OutputItems._public(i) for i in self.output.items] if done else [],
            "max_output_tokens": req.max_output_tokens, "temperature": req.temperature, "top_p": req.top_p,
            "tools": req.tools or [], "tool_choice": req.tool_choice or "auto",
            "parallel_tool_calls": req.parallel_tool_calls, "text": req.text or {"format": {"type": "text"}},
            "reasoning": req.reasoning or {"effort": None, "summary": None}, "store": False,
            "previous_response_id": None, "truncation": "disabled",
            "metadata": (req.model_extra or {}).get("metadata") or {},
            "usage": _usage(self.ctx, self.prompt_tokens, self.choice, self.output.items) if done else None,
        }

    def status(self) -> str:
        reason = openai_finish_reason(self.choice.stream.output.outputs[0].finish_reason)
        return "incomplete" if reason == "length" else "completed"

    async def whole(self, request: Request):
        c = self.choice
        result = asyncio.ensure_future(c.stream.aresult())
        watch = asyncio.ensure_future(_watch_disconnect(request, [c]))
        try:
            await asyncio.wait({result, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        try:
            out = await result
        except TrtcError as e:
            raise APIError(503, str(e)) from None
        _record(self.ctx, c)
        if watch.done() and not watch.cancelled():
            return Response(status_code=499)
        self.output.feed(c.reply.feed(out.outputs[0].text))
        self.output.feed(c.reply.finish())
        status = self.status()
        self.output.finish(c.reply.calls, status == "incomplete")
        return JSONResponse(self.body(status))

    async def events(self, request: Request) -> AsyncIterator[str]:
        c, seq = self.choice, 0
        watch = asyncio.ensure_future(_watch_disconnect(request, [c]))

        def sse(event: dict) -> str:
            nonlocal seq
            event = {**event, "sequence_number": seq}
            seq += 1
            return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

        try:
            yield sse({"type": "response.created", "response": self.body("in_progress")})
            yield sse({"type": "response.in_progress", "response": self.body("in_progress")})
            async for delta in c.stream.deltas():
                for event in self.output.feed(c.reply.feed(delta.outputs[0].text)):
                    yield sse(event)
            status = self.status()
            for event in self.output.feed(c.reply.finish()) + self.output.finish(c.reply.calls, status == "incomplete"):
                yield sse(event)
            _record(self.ctx, c)
            yield sse({"type": f"response.{status}", "response": self.body(status)})
        except TrtcError as e:
            yield sse({"type": "error", "code": "503", "message": str(e), "param": None})
        finally:
            watch.cancel()
            if not c.stream.finished:
                c.stream.abort()
            _record(self.ctx, c)
