"""The FastAPI application: OpenAI routes, /health, /version, /metrics, bearer-key auth, errors.
vLLM's tokenizer routes are in trtc/serve/tokenize.py, the Responses API in trtc/serve/responses.py.

Every error a client can cause is answered with an OpenAI error object and a 4xx; an unexpected
exception is logged and answered with a 500 error object (never a traceback), and the server goes
on serving.
"""

from __future__ import annotations

import logging
import secrets
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from trtc.llm import LLM
from trtc.runtime.async_engine import EngineStats
from trtc.serve.async_llm import AsyncLLM
from trtc.serve.completions import ServeContext, serve_completion
from trtc.serve.errors import APIError, error_response, parse_body
from trtc.serve.fields import check_fields
from trtc.serve.lora import LoRATable, add_lora_routes
from trtc.serve.metrics import ServerMetrics
from trtc.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from trtc.serve.responses import add_responses_routes
from trtc.serve.tokenize import add_tokenizer_routes
from trtc.version import __version__

log = logging.getLogger("trtc")


class GuardMiddleware:
    """Bearer-key auth of /v1 routes, and a 500 error object (logged) for an exception that no handler
    took. A plain ASGI middleware: the response's messages pass straight through, so a stream's chunks
    cost no more here than a call."""

    def __init__(self, app, api_key: str | None) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self._expected is not None and scope["path"].startswith("/v1"):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not secrets.compare_digest(given, self._expected):
                response = error_response(401, "missing or wrong API key; send Authorization: Bearer KEY")
                return await response(scope, receive, send)
        started = False

        async def watch_start(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch_start)
        except Exception:  # noqa: BLE001 - logged; the client gets an error object, the server goes on
            log.exception("error serving %s", scope["path"])
            if not started:
                response = error_response(500, "internal error while serving the request; see the server log")
                await response(scope, receive, send)


def create_app(llm: LLM | AsyncLLM, model_name: str, chat_template: str | None = None, api_key: str | None = None,
               max_queued_requests: int | None = None, tool_call_parser: str | None = None,
               reasoning_parser: str | None = None, on_engine_dead=None, loras: LoRATable | None = None,
               single_front: bool = True) -> FastAPI:
    """on_engine_dead: called (on the event loop) once the engine stops on a broken device. loras: the
    LoRA adapters served by name (trtc/serve/lora.py); single_front: adapters may be loaded at run time."""
    def stats() -> EngineStats:
        engine = llm.async_engine
        return engine.stats if engine is not None else EngineStats(num_blocks=llm.num_blocks)

    ctx = ServeContext(llm, model_name, ServerMetrics(stats, model_name), chat_template, max_queued_requests,
                       tool_call_parser=tool_call_parser, reasoning_parser=reasoning_parser,
                       loras=loras.by_name if loras is not None else {})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        llm.start_async_engine().on_dead = on_engine_dead  # the engine thread, on uvicorn's loop
        yield
        ctx.shutting_down = True

    app = FastAPI(title="trtc", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ctx = ctx

    app.add_middleware(GuardMiddleware, api_key=api_key)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(400, str(exc.errors()[0].get("msg", exc)))

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name and name not in ctx.loras:
            served = ", ".join(repr(n) for n in [model_name, *ctx.loras])
            raise APIError(404, f"the model {name!r} does not exist; this server serves {served}", "model")

    @app.get("/health")
    async def health():
        engine = llm.async_engine
        if ctx.shutting_down or engine is None or not engine.alive:
            return error_response(503, "the engine is not running")
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics():
        return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card(name: str = model_name) -> ModelCard:
        return ModelCard(id=name, max_model_len=llm.max_seq_len, parent=None if name == model_name else model_name)

    @app.get("/v1/models")
    async def models():
        return JSONResponse(ModelList(data=[model_card(), *(model_card(n) for n in ctx.loras)]).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(model_id)
        return JSONResponse(model_card(model_id).model_dump())

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse_body(request, CompletionRequest)
        check_model(req.model)
        check_fields(req, "completions")
        return await serve_completion(ctx, request, req)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse_body(request, ChatCompletionRequest)
        check_model(req.model)
        check_fields(req, "chat")
        return await serve_completion(ctx, request, req)

    add_tokenizer_routes(app, ctx, check_model)
    add_responses_routes(app, ctx, check_model)
    if loras is not None and loras.enabled:
        add_lora_routes(app, loras, single_front)
    return app
