"""`trtc serve`: start the engine core process (it loads the engine), start uvicorn, shut down gracefully.

Two processes, as vLLM's AsyncLLM / EngineCore: this one (HTTP, JSON, tokenization,
detokenization, SSE: trtc/serve/async_llm.py) and the engine core (trtc/runtime/engine_core.py),
which owns the executor and steps it without pause; they talk over ZeroMQ. The core ends with this
process (it watches its parent), so none is left behind.

SIGTERM / SIGINT: uvicorn stops accepting connections; the engine ends every in-flight request at
the next step (finish reason "abort"), so open streams get their final chunk and `[DONE]`; then the
engine's memory is freed and tensor-parallel ranks are stopped, and the process exits 0.

A step that fails (out of memory, say) fails its own requests (HTTP 500) and the server goes on. A
broken device (a CUDA error, a dead tensor-parallel rank) stops the engine: /health answers 503,
`trtc:engine_dead` is 1, the open requests hear why, and the process exits 1 so that an orchestrator
restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

import uvicorn
import yaml

from trtc.errors import TrtcError
from trtc.serve.app import create_app
from trtc.serve.async_llm import AsyncLLM
from trtc.serve.chat import load_chat_template

log = logging.getLogger("trtc")
DEAD_EXIT_DELAY_S = 2.0  # a dead engine's server answers /health 503 this long before it exits


@dataclass
class ServeConfig:
    """`trtc serve` options; --config serve.yaml gives any of them (flags given on the command line win)."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    tp_size: int = 1
    api_key: str | None = None
    served_model_name: str | None = None
    chat_template: str | None = None
    max_queued_requests: int | None = None
    kv_cache_free_gpu_memory_fraction: float = 0.9
    device: str | None = None
    log_level: str = "info"
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None


def read_config(path: str | Path) -> dict:
    """The options of a serve.yaml file (keys are the flag names without dashes)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise TrtcError(f"could not read --config {p}: {e}") from None
    if not isinstance(data, dict):
        raise TrtcError(f"--config {p} must be a YAML mapping of option names to values")
    known = {f.name for f in fields(ServeConfig)} | {"tp"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TrtcError(f"--config {p}: unknown option {unknown[0]!r}; known: {', '.join(sorted(known))}")
    if "tp" in data:
        data["tp_size"] = data.pop("tp")
    return data


class GracefulServer(uvicorn.Server):
    """uvicorn, whose exit signal also ends the engine's in-flight requests (their streams close)."""

    def __init__(self, config: uvicorn.Config, on_exit) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after shutting down (so the process dies of it); the shutdown
        # here is complete and orderly, so `trtc serve` exits 0 instead
        if hasattr(self, "_captured_signals"):
            self._captured_signals.clear()


def serve(cfg: ServeConfig) -> None:
    api_key = cfg.api_key or os.environ.get("TRTC_API_KEY") or None
    template = load_chat_template(cfg.chat_template)
    if cfg.max_queued_requests is not None and cfg.max_queued_requests < 0:
        raise TrtcError(f"--max_queued_requests must be >= 0, got {cfg.max_queued_requests}")
    llm = AsyncLLM(cfg.model, tp_size=cfg.tp_size, kv_cache_free_gpu_memory_fraction=cfg.kv_cache_free_gpu_memory_fraction,
                   device=cfg.device)  # the engine core process: loads the engine and steps it
    dead: list[str] = []  # why the engine stopped, once it has
    server: GracefulServer | None = None

    def on_engine_dead() -> None:  # the open requests have their error; /health says 503 a moment, then exit
        dead.append(str(llm.async_engine.error) if llm.async_engine is not None else "unknown")
        log.error("the engine stopped on an error; the server exits")
        app.state.ctx.shutting_down = True
        asyncio.get_running_loop().call_later(DEAD_EXIT_DELAY_S, setattr, server, "should_exit", True)

    try:
        name = cfg.served_model_name or Path(cfg.model).name
        app = create_app(llm, name, template, api_key, cfg.max_queued_requests, cfg.tool_call_parser,
                         cfg.reasoning_parser, on_engine_dead)

        def on_exit() -> None:
            app.state.ctx.shutting_down = True
            if llm.async_engine is not None:
                llm.async_engine.abort_all()

        config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                                timeout_graceful_shutdown=30, access_log=False)
        log.info("serving %s as %r on http://%s:%d%s", llm.engine_dir, name, cfg.host, cfg.port,
                 " (API key required)" if api_key else "")
        server = GracefulServer(config, on_exit)
        server.run()
        if not server.started:
            raise TrtcError(f"could not listen on {cfg.host}:{cfg.port}; is the port in use? pick another with --port")
        if dead:
            raise TrtcError(f"the engine stopped on an error ({dead[0]}); restart the server")
    finally:
        llm.close()
