"""vLLM's tokenizer routes: POST /tokenize, POST /detokenize, GET /tokenizer_info.

    /tokenize       {"prompt": text} or {"messages": [...]} (rendered with the chat template, as chat does)
                    -> {"count", "max_model_len", "tokens", "token_strs"}
    /detokenize     {"tokens": [ids]} -> {"prompt": text}
    /tokenizer_info the tokenizer's class and its JSON-serialisable configuration (eos_token, chat_template, ...)

Request and response fields are vLLM's (TokenizeCompletionRequest / TokenizeChatRequest, DetokenizeRequest),
so clients written for vLLM (lm-eval's remote tokenizer) work unchanged.
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from trtc.serve.chat import render_chat
from trtc.serve.errors import APIError, parse_body
from trtc.serve.protocol import ChatMessage


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (the template adds them)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict | None = None
    tools: list[dict] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


def _json_safe(config: dict) -> dict:
    out = {}
    for key, value in config.items():
        value = str(value) if type(value).__name__ == "AddedToken" else value
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out


def add_tokenizer_routes(app: FastAPI, ctx, check_model) -> None:
    def max_model_len() -> int:
        return ctx.llm.max_seq_len

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await parse_body(request, TokenizeRequest)
        check_model(req.model)
        tokenizer = ctx.llm.tokenizer
        if req.messages is not None:
            text = render_chat(tokenizer, req.messages, ctx.chat_template, req.add_generation_prompt, req.tools,
                               req.chat_template_kwargs)
            special = bool(req.add_special_tokens)
        else:
            text, special = req.prompt, req.add_special_tokens is not False
        ids = tokenizer(text, add_special_tokens=special).input_ids
        body = {"count": len(ids), "max_model_len": max_model_len(), "tokens": ids, "token_strs": None}
        if req.return_token_strs:
            body["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
        return body

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await parse_body(request, DetokenizeRequest)
        check_model(req.model)
        vocab, tokenizer = ctx.llm.engine.graph.vocab_size, ctx.llm.tokenizer
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens: {bad[0]} is not a token id of the model; send ids in [0, {vocab})", "tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tokenizer = ctx.llm.tokenizer
        info = _json_safe(dict(getattr(tokenizer, "init_kwargs", {}) or {}))
        info["tokenizer_class"] = type(tokenizer).__name__
        template = ctx.chat_template or getattr(tokenizer, "chat_template", None)
        if template:
            info["chat_template"] = template
        info.setdefault("model_max_length", max_model_len())
        return info
