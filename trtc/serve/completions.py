"""/v1/completions and /v1/chat/completions: a request → engine streams → an OpenAI response.

The handler only translates: it tokenizes, submits one engine request per (prompt, sample), then
either awaits them all or streams their deltas as SSE chunks ending in `data: [DONE]`. A client
that disconnects aborts its requests (the ASGI http.disconnect message is watched alongside, as
vLLM does), so their KV blocks go back to the pool at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from trtc.errors import TrtcError
from trtc.llm import LLM
from trtc.runtime.lora import LoRARequest
from trtc.runtime.request_stream import RequestStream
from trtc.serve.async_llm import AsyncLLM
from trtc.serve.chat import render_chat
from trtc.serve.errors import APIError, error_body
from trtc.serve.metrics import ServerMetrics
from trtc.serve.protocol import ChatCompletionRequest, CompletionRequest
from trtc.serve.structured import ChatReplyParser
from trtc.serve.tool_parsers import TOOL_PARSERS

FINISH_REASONS = {"end_id": "stop", "stop_words": "stop", "stop": "stop", "length": "length", "cancelled": "abort"}


@dataclass
class ServeContext:
    llm: LLM | AsyncLLM  # the server's: AsyncLLM (the engine core in its own process)
    model_name: str
    metrics: ServerMetrics
    chat_template: str | None = None
    max_queued_requests: int | None = None
    shutting_down: bool = False
    tool_call_parser: str | None = None  # --tool_call_parser: tool calls of tool_choice "auto"
    reasoning_parser: str | None = None  # --reasoning_parser: <think>...</think> -> reasoning_content
    loras: dict[str, LoRARequest] = field(default_factory=dict)  # served adapter name -> its request


@dataclass
class Choice:
    index: int
    stream: RequestStream
    prompt_text: str | None  # for echo
    reply: ChatReplyParser | None = None  # chat: reasoning and tool calls out of the text
    first: Choice | None = None  # sample 0 of the same prompt, which computed the prompt's logprobs
    drop_output: bool = False  # max_tokens 0: the engine's one token is not returned
    echoed: bool = False  # streaming: the prompt's chunk was sent
    recorded: bool = False  # counted in the metrics

    @property
    def prompt_logprobs(self):
        """PromptLogprobs of the prompt (trtc/runtime/outputs.py), None if not asked for."""
        return (self.first or self).stream.output.prompt_logprobs

    def visible(self):
        """The CompletionOutput as the client sees it (nothing generated for max_tokens 0)."""
        o = self.stream.output.outputs[0]
        if not self.drop_output:
            return o
        return replace(o, text="", token_ids=[], logprobs=None if o.logprobs is None else [],
                       top_logprobs=None if o.top_logprobs is None else [])


def openai_finish_reason(reason: str | None) -> str | None:
    return None if reason is None else FINISH_REASONS.get(reason, reason)


async def _submit(ctx: ServeContext, req, prompts: list[str | list[int]], max_tokens: int | None,
                  logprobs: bool, max_tokens_name: str | None = None) -> tuple[list[Choice], int]:
    """Tokenize, check and submit every (prompt, sample); returns the choices and the prompt tokens.
    max_tokens_name: the field the client sent the length in, for the errors that name it."""
    llm, max_seq_len = ctx.llm, ctx.llm.max_seq_len
    ids = [llm.tokenizer(p).input_ids if isinstance(p, str) else p for p in prompts]
    prompt_top = req.requested_prompt_logprobs()
    echo = isinstance(req, CompletionRequest) and req.echo
    plans = []
    where = "prompt" if isinstance(req, CompletionRequest) else "messages"
    for p, prompt_ids in zip(prompts, ids):
        if max_tokens is None and len(prompt_ids) >= max_seq_len:  # the default max_tokens fills what is left
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens, which leaves no room for a reply within the "
                                f"engine's max_seq_len {max_seq_len}; shorten the {where}", where)
        n_tokens = max_tokens if max_tokens is not None else max_seq_len - len(prompt_ids)
        for j in range(req.n):
            try:  # max_tokens 0: the engine samples one token (from the prompt's last row), not returned
                params = req.sampling_params(max(1, n_tokens), logprobs, seed_offset=j,
                                             prompt_logprobs=prompt_top if j == 0 else None)
            except ValueError as e:
                raise APIError(400, str(e), "logit_bias" if "logit_bias" in str(e) else None) from None
            if params.guided_decoding is not None and j == 0:  # compiled off the event loop, once (cached)
                try:
                    await asyncio.to_thread(llm.guided_decoder.compile, params.guided_decoding)
                except TrtcError as e:
                    raise APIError(400, str(e)) from None
            try:
                llm.check_prompt(prompt_ids, params)
            except TrtcError as e:
                message = str(e)
                if getattr(req, "max_completion_tokens", None) is not None:  # name the field that was sent
                    message = message.replace("max_tokens", max_tokens_name or "max_completion_tokens")
                raise APIError(400, message, "logit_bias" if "logit_bias" in message else where) from None
            text = p if isinstance(p, str) else llm.tokenizer.decode(prompt_ids) if echo else None
            plans.append((text, prompt_ids, params, j))
    engine = llm.start_async_engine()
    if ctx.shutting_down or not engine.alive:
        raise APIError(503, "the server is shutting down" if ctx.shutting_down else "the engine is not running")
    if ctx.max_queued_requests is not None and engine.num_waiting() + len(plans) > ctx.max_queued_requests:
        raise APIError(503, f"the server is at capacity ({engine.num_waiting()} requests waiting, at most "
                            f"{ctx.max_queued_requests}); retry later")
    choices, first = [], None
    for i, (text, prompt_ids, params, j) in enumerate(plans):  # samples 1..n-1 share sample 0's prompt blocks
        stream = llm.generate_async(prompt_ids, params, after=first.stream if j > 0 else None,
                                    lora_request=ctx.loras.get(getattr(req, "model", None) or ""))
        choices.append(Choice(i, stream, text, first=first if j > 0 else None, drop_output=max_tokens == 0))
        first = choices[-1] if j == 0 else first
    for c in choices:
        c.stream.output.prompt = c.prompt_text
    return choices, sum(len(x) for x in ids) * req.n


async def _watch_disconnect(request: Request, choices: list[Choice]) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for c in choices:
                c.stream.abort()
            return


def _usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(len(c.visible().token_ids) for c in choices)
    cached = sum(c.stream.output.num_cached_tokens or 0 for c in choices)  # prompt tokens from the prefix cache
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _token_strings(llm: LLM, token_ids: list[int]) -> list[str]:
    return [llm.tokenizer.decode([t]) for t in token_ids] if token_ids else []


def _completion_logprobs(llm: LLM, token_ids: list[int], logprobs: list[float], offset: int,
                         tops: list[dict[int, float]] | None) -> dict:
    """tops: each token's {token id: logprob} alternatives (None: not asked for)."""
    tokens = _token_strings(llm, token_ids)
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    top = None if tops is None else [dict(zip(_token_strings(llm, list(alt)), alt.values())) for alt in tops]
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def _echo_logprobs(llm: LLM, prompt_ids: list[int], scored, n: int) -> dict:
    """The prompt's part of an echo response's logprobs (OpenAI's legacy shape, as vLLM gives it):
    None for the first token; top_logprobs hold the prompt's token and the n most likely."""
    tokens = _token_strings(llm, prompt_ids)
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    logprobs, tops = [None], [None]
    for token, entry in zip(prompt_ids[1:], scored[1:]):
        logprobs.append(entry[token].logprob)
        alts = [t for t, lp in entry.items() if t == token or lp.rank <= n]
        tops.append(dict(zip(_token_strings(llm, alts), (entry[t].logprob for t in alts))))
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def _with_echo(llm: LLM, c: Choice, n: int, lp: dict) -> dict:
    """The prompt's logprobs (echo) followed by the completion's `lp`."""
    prompt = _echo_logprobs(llm, c.stream.output.prompt_token_ids, c.prompt_logprobs, n)
    tops = lp["top_logprobs"] or [{t: v} for t, v in zip(lp["tokens"], lp["token_logprobs"])]
    return {"tokens": prompt["tokens"] + lp["tokens"], "token_logprobs": prompt["token_logprobs"] + lp["token_logprobs"],
            "top_logprobs": prompt["top_logprobs"] + tops, "text_offset": prompt["text_offset"] + lp["text_offset"]}


def _prompt_logprobs_json(llm: LLM, scored) -> list | None:
    """vLLM's `prompt_logprobs`: None first, then {token id: {logprob, rank, decoded_token}} per position."""
    if scored is None:
        return None
    out = [None]
    for entry in scored[1:]:
        texts = _token_strings(llm, list(entry))
        out.append({t: {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": s}
                    for (t, lp), s in zip(entry.items(), texts)})
    return out


def _chat_logprobs(llm: LLM, token_ids: list[int], logprobs: list[float], tops: list[dict[int, float]] | None) -> dict:
    def entry(token: str, lp: float) -> dict:
        return {"token": token, "logprob": lp, "bytes": list(token.encode())}

    alts = tops if tops is not None else [{}] * len(token_ids)
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(s, v) for s, v in zip(_token_strings(llm, list(alt)),
                                                                                    alt.values())]}
                        for t, lp, alt in zip(_token_strings(llm, token_ids), logprobs, alts)]}


def _record(ctx: ServeContext, choice: Choice) -> None:
    if choice.recorded:
        return
    choice.recorded = True
    ctx.metrics.record(choice.stream, openai_finish_reason(choice.stream.output.outputs[0].finish_reason) or "abort")


async def serve_completion(ctx: ServeContext, request: Request, req: CompletionRequest | ChatCompletionRequest):
    chat = isinstance(req, ChatCompletionRequest)
    if chat:
        tools = _check_tools(ctx, req)
        prompts = [render_chat(ctx.llm.tokenizer, req.messages, ctx.chat_template, req.add_generation_prompt, tools,
                               req.template_kwargs())]
        max_tokens, logprobs = req.requested_max_tokens(), req.logprobs
    else:
        prompts, max_tokens, logprobs = req.prompts(), req.max_tokens, req.logprobs is not None
    choices, prompt_tokens = await _submit(ctx, req, prompts, max_tokens, logprobs)
    if chat:
        for c in choices:
            c.reply = ChatReplyParser(ctx.reasoning_parser, ctx.tool_call_parser if tools else None, req.tool_choice,
                                      req.forced_tool_choice)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    if req.stream:
        return StreamingResponse(_sse(ctx, request, req, choices, prompt_tokens, rid, chat),
                                 media_type="text/event-stream")
    gather = asyncio.ensure_future(asyncio.gather(*[c.stream.aresult() for c in choices]))
    watch = asyncio.ensure_future(_watch_disconnect(request, choices))
    try:
        await asyncio.wait({gather, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    try:
        await gather  # after a disconnect the aborted requests end at the next step
    except TrtcError as e:
        raise APIError(503, str(e)) from None
    for c in choices:
        _record(ctx, c)
    if watch.done() and not watch.cancelled():
        return Response(status_code=499)  # nobody reads it
    failed = next((c.stream.output for c in choices if c.stream.output.outputs[0].finish_reason == "error"), None)
    if failed is not None:  # a failed step (out of memory, say) ended it; the engine goes on
        raise APIError(500, failed.error or "the request failed in the engine; retry it")
    return JSONResponse(_full_response(ctx, req, choices, prompt_tokens, rid, chat))


def _check_tools(ctx: ServeContext, req: ChatCompletionRequest) -> list[dict] | None:
    """The tools the chat template renders (none for tool_choice "none"); a 400 for "auto" without a parser."""
    if not req.tools or req.tool_choice == "none":
        return None
    if req.tool_choice in (None, "auto") and ctx.tool_call_parser is None:
        raise APIError(400, "tools with tool_choice 'auto' need the server started with --tool_call_parser NAME "
                            f"({', '.join(TOOL_PARSERS)}); or send tool_choice 'required' or a named function", "tool_choice")
    return req.tools


def _chat_finish_reason(c: Choice, reason: str | None) -> str | None:
    return "tool_calls" if reason == "stop" and c.reply is not None and c.reply.calls else reason


def _full_response(ctx, req, choices: list[Choice], prompt_tokens: int, rid: str, chat: bool) -> dict:
    out, prompt_logprobs = [], None
    for c in choices:
        o = c.visible()
        reason = openai_finish_reason(o.finish_reason)
        if chat:
            lp = _chat_logprobs(ctx.llm, o.token_ids, o.logprobs, o.top_logprobs) if req.logprobs else None
            message = c.reply.message(o.text) if c.reply is not None else {"role": "assistant", "content": o.text}
            out.append({"index": c.index, "message": message, "logprobs": lp,
                        "finish_reason": _chat_finish_reason(c, reason)})
            if req.prompt_logprobs is not None and prompt_logprobs is None:  # vLLM: one list, on the response
                prompt_logprobs = _prompt_logprobs_json(ctx.llm, c.prompt_logprobs)
        else:
            prefix = (c.prompt_text or "") if req.echo else ""
            lp = _completion_logprobs(ctx.llm, o.token_ids, o.logprobs, len(prefix), o.top_logprobs) if req.logprobs is not None else None
            if lp is not None and req.echo:
                lp = _with_echo(ctx.llm, c, req.logprobs, lp)
            choice = {"index": c.index, "text": prefix + o.text, "logprobs": lp, "finish_reason": reason}
            if req.prompt_logprobs is not None:  # vLLM's extension, on each choice
                choice["prompt_logprobs"] = _prompt_logprobs_json(ctx.llm, c.prompt_logprobs)
            out.append(choice)
    body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": ctx.model_name, "choices": out, "usage": _usage(prompt_tokens, choices)}
    if chat and req.prompt_logprobs is not None:
        body["prompt_logprobs"] = prompt_logprobs
    return body


async def _merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, object]]:
    """Deltas of all choices as they come: (choice, RequestOutput delta)."""
    if len(choices) == 1:  # the common case: no task and queue in between
        c = choices[0]
        try:
            async for delta in c.stream.deltas():
                yield c, delta
        except TrtcError as e:
            yield c, e
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice) -> None:
        try:
            async for delta in c.stream.deltas():
                await queue.put((c, delta))
        except TrtcError as e:
            await queue.put((c, e))
        finally:
            await queue.put((c, None))

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        for _ in range(len(choices)):
            while True:
                c, item = await queue.get()
                if item is None:
                    break
                yield c, item
    finally:
        for t in tasks:
            t.cancel()


def _chat_delta(reply: ChatReplyParser | None, text: str, finished: bool) -> dict:
    """The choice's delta: content, and reasoning_content / tool_calls fragments (the parsers hold back text
    that may open a marker until the next delta)."""
    if reply is None:
        return {"content": text} if text else {}
    d = reply.feed(text)
    if finished:
        for key, value in reply.finish().items():
            d[key] = d.get(key, [] if key == "tool_calls" else "") + value
    return d


async def _sse(ctx: ServeContext, request: Request, req, choices: list[Choice], prompt_tokens: int, rid: str,
               chat: bool) -> AsyncIterator[str]:
    created, obj = int(time.time()), "chat.completion.chunk" if chat else "text_completion"
    watch = asyncio.ensure_future(_watch_disconnect(request, choices))

    head = (f'data: {{"id": {json.dumps(rid)}, "object": "{obj}", "created": {created}, '
            f'"model": {json.dumps(ctx.model_name)}, "choices": ')

    def chunk(choice_list: list[dict], usage: dict | None = None) -> str:
        """One SSE event: json.dumps of the chunk object, its constant fields rendered once per stream."""
        tail = f', "usage": {json.dumps(usage)}}}\n\n' if req.include_usage else "}\n\n"
        return head + json.dumps(choice_list) + tail

    try:
        if chat:
            yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for c in choices])
        elif req.echo and req.logprobs is None:
            yield chunk([{"index": c.index, "text": c.prompt_text or "", "logprobs": None, "finish_reason": None}
                         for c in choices])
            for c in choices:
                c.echoed = True
        async for c, delta in _merged(choices):
            if isinstance(delta, TrtcError):
                yield f"data: {json.dumps({'error': {'message': str(delta), 'type': 'ServiceUnavailableError', 'param': None, 'code': 503}})}\n\n"
                continue
            o = delta.outputs[0]
            reason = openai_finish_reason(o.finish_reason) if delta.finished else None
            if chat:
                lp = _chat_logprobs(ctx.llm, o.token_ids, o.logprobs, o.top_logprobs) if req.logprobs else None
                d = _chat_delta(c.reply, o.text, delta.finished)
                if d or reason is not None or lp is not None:
                    yield chunk([{"index": c.index, "delta": d, "logprobs": lp,
                                  "finish_reason": _chat_finish_reason(c, reason)}])
            else:
                if req.echo and not c.echoed:  # with logprobs: the prompt's come with its first token
                    c.echoed = True
                    echo = _echo_logprobs(ctx.llm, c.stream.output.prompt_token_ids, c.prompt_logprobs, req.logprobs)
                    yield chunk([{"index": c.index, "text": c.prompt_text or "", "logprobs": echo, "finish_reason": None}])
                lp = _completion_logprobs(ctx.llm, o.token_ids, o.logprobs, 0, o.top_logprobs) if req.logprobs is not None else None
                yield chunk([{"index": c.index, "text": o.text, "logprobs": lp, "finish_reason": reason}])
            if delta.finished:
                _record(ctx, c)
                if o.finish_reason == "error":
                    yield f"data: {json.dumps(error_body(500, c.stream.output.error or 'the request failed'))}\n\n"
        if req.include_usage:
            yield chunk([], _usage(prompt_tokens, choices))
        yield "data: [DONE]\n\n"
    finally:
        watch.cancel()
        for c in choices:
            if not c.stream.finished:
                c.stream.abort()
            _record(ctx, c)  # a client that left mid-stream: "abort", as a non-streamed disconnect
