"""`trtc serve`: start the engine core process (it loads the engine), start uvicorn, shut down gracefully.

Two processes, as vLLM's AsyncLLM / EngineCore: this one (HTTP, JSON, tokenization,
detokenization, SSE: trtc/serve/async_llm.py) and the engine core (trtc/runtime/engine_core.py),
which owns the executor and steps it without pause; they talk over ZeroMQ. The core ends with this
process (it watches its parent), so none is left behind.

--api_server_count N (vLLM's flag): N - 1 more API server processes, spawned here, accept on the same
listening socket and talk to the same core, each over its own pair of sockets; so the HTTP, JSON and
detokenization work of many streams spreads over N cores. /metrics sums all N (prometheus_client's
multiprocess mode). If one of them exits, the server stops (exit 1), as it does for a dead engine.

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
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import uvicorn
import yaml

from trtc.errors import TrtcError
from trtc.runtime.engine_client import CORE_EXIT_S
from trtc.runtime.engine_core import child_process_setup
from trtc.runtime.speculative import SpeculativeConfig, speculative_config
from trtc.serve.async_llm import AsyncLLM
from trtc.serve.chat import load_chat_template
from trtc.serve.lora import LoRATable

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
    kv_cache_max_tokens: int | None = None
    speculative_decoding_mode: str | None = None
    max_draft_len: int | None = None
    draft_engine_dir: str | None = None
    enable_lora: bool = False
    lora_modules: list[str] = field(default_factory=list)  # NAME=PATH of each PEFT adapter served
    max_loras: int = 4
    max_lora_rank: int = 16
    device: str | None = None
    log_level: str = "info"
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    api_server_count: int = 1

    @property
    def lora_enabled(self) -> bool:
        """Adapter slots in the engine core: --enable_lora, or adapters given with --lora_modules."""
        return self.enable_lora or bool(self.lora_modules)

    def speculative_config(self) -> SpeculativeConfig | None:
        return speculative_config(self.speculative_decoding_mode, self.max_draft_len, self.draft_engine_dir)


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
    """uvicorn, whose exit signal also ends the engine's in-flight requests (their streams close), and
    which stops when one of the other API server processes (`fronts`) has exited."""

    def __init__(self, config: uvicorn.Config, on_exit, fronts: list[multiprocessing.Process] = (),
                 on_started=None) -> None:
        super().__init__(config)
        self._on_exit, self._on_started = on_exit, on_started
        self.fronts = list(fronts)
        self.front_failed: str | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)  # the signal handlers are in place, the sockets served
        if self.started and self._on_started is not None:
            self._on_started()

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()
        for p in self.fronts:  # each stops as this one does (its streams end, then it exits)
            if p.is_alive():
                p.terminate()
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after shutting down (so the process dies of it); the shutdown
        # here is complete and orderly, so `trtc serve` exits 0 instead
        if hasattr(self, "_captured_signals"):
            self._captured_signals.clear()

    async def on_tick(self, counter: int) -> bool:
        for k, p in enumerate(self.fronts, 1):
            if p.exitcode is not None and self.front_failed is None and not self.should_exit:
                self.front_failed = f"API server {k} exited with status {p.exitcode}"
                log.error("%s; the server stops", self.front_failed)
                self._on_exit()
                for q in self.fronts:
                    q.terminate() if q.is_alive() else None
                return True
        return await super().on_tick(counter)


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket that every API server process accepts on."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise TrtcError(f"could not listen on {host}:{port} ({e.strerror}); is the port in use? pick another with "
                        "--port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(cfg: ServeConfig) -> None:
    api_key = cfg.api_key or os.environ.get("TRTC_API_KEY") or None
    template = load_chat_template(cfg.chat_template)
    if cfg.max_queued_requests is not None and cfg.max_queued_requests < 0:
        raise TrtcError(f"--max_queued_requests must be >= 0, got {cfg.max_queued_requests}")
    n = cfg.api_server_count
    if n < 1:
        raise TrtcError(f"--api_server_count must be >= 1, got {n}")
    metrics_dir = None
    if n > 1:  # before prometheus_client is imported, here and in the other API servers
        metrics_dir = tempfile.mkdtemp(prefix="trtc-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    fronts: list[multiprocessing.Process] = []
    try:
        sock = bind_socket(cfg.host, cfg.port) if n > 1 else None  # a port in use fails before the engine loads
        llm = AsyncLLM(cfg.model, tp_size=cfg.tp_size, device=cfg.device, num_fronts=n,  # the engine core process
                       kv_cache_free_gpu_memory_fraction=cfg.kv_cache_free_gpu_memory_fraction,
                       kv_cache_max_tokens=cfg.kv_cache_max_tokens, speculative_config=cfg.speculative_config(),
                       max_loras=cfg.max_loras if cfg.lora_enabled else 0,
                       max_lora_rank=cfg.max_lora_rank)
        try:
            spawn = multiprocessing.get_context("spawn")
            ready, go = [spawn.Event() for _ in range(1, n)], spawn.Event()
            for k in range(1, n):
                fronts.append(spawn.Process(target=_front_main, args=(cfg, llm.async_engine.addresses[k], k, sock,
                                                                      llm.async_engine.process.pid, ready[k - 1], go),
                                            name=f"trtc-api-server-{k}", daemon=True))
                fronts[-1].start()
            for k, (p, event) in enumerate(zip(fronts, ready), 1):  # all serve before this one says it does
                while not event.wait(0.5):
                    if p.exitcode is not None:
                        raise TrtcError(f"API server {k} exited with status {p.exitcode} while starting; see its "
                                        "lines above")
            run_front(cfg, llm, api_key, template, sock, fronts, on_started=go.set if fronts else None)
        finally:
            for p in fronts:  # already told on a signal; not when this one failed or its engine died
                p.terminate() if p.is_alive() else None
            for p in fronts:
                p.join(CORE_EXIT_S)
                p.kill() if p.is_alive() else None
            llm.close()
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def run_front(cfg: ServeConfig, llm: AsyncLLM, api_key: str | None, template: str | None,
              sock: socket.socket | None, fronts: list[multiprocessing.Process] = (), ready=None, go=None,
              on_started=None) -> None:
    """Serve HTTP in this process over `llm`'s engine core until a signal, a dead engine or a dead front.
    Another API server process sets `ready` once its app is made and serves once `go` is set (front 0
    sets it when it serves, its signal handlers in place: before that a signal would kill it outright)."""
    from trtc.serve.app import create_app  # after PROMETHEUS_MULTIPROC_DIR is set

    dead: list[str] = []  # why the engine stopped, once it has
    server: GracefulServer | None = None

    def on_engine_dead() -> None:  # the open requests have their error; /health says 503 a moment, then exit
        dead.append(str(llm.async_engine.error) if llm.async_engine is not None else "unknown")
        log.error("the engine stopped on an error; the server exits")
        app.state.ctx.shutting_down = True
        asyncio.get_running_loop().call_later(DEAD_EXIT_DELAY_S, setattr, server, "should_exit", True)

    name = cfg.served_model_name or Path(cfg.model).name
    loras = LoRATable.from_modules(llm.engine, list(cfg.lora_modules), cfg.max_lora_rank, cfg.lora_enabled)
    app = create_app(llm, name, template, api_key, cfg.max_queued_requests, cfg.tool_call_parser,
                     cfg.reasoning_parser, on_engine_dead, loras, cfg.api_server_count == 1)

    def on_exit() -> None:
        app.state.ctx.shutting_down = True
        if llm.async_engine is not None:
            llm.async_engine.abort_all()

    other = sock is not None and not fronts  # another API server process: front 0 says where it serves
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, access_log=False, timeout_graceful_shutdown=30,
                            log_level="warning" if other and cfg.log_level in ("debug", "info") else cfg.log_level)
    if not other:
        log.info("serving %s as %r on http://%s:%d%s%s", llm.engine_dir, name, cfg.host, cfg.port,
                 " (API key required)" if api_key else "",
                 f" with {cfg.api_server_count} API server processes" if cfg.api_server_count > 1 else "")
    server = GracefulServer(config, on_exit, fronts, on_started)
    if ready is not None:
        ready.set()
        go.wait()
    server.run(sockets=None if sock is None else [sock])
    if not server.started:
        raise TrtcError(f"could not listen on {cfg.host}:{cfg.port}; is the port in use? pick another with --port")
    if server.front_failed:
        raise TrtcError(f"{server.front_failed}; see its lines above")
    if dead:
        raise TrtcError(f"the engine stopped on an error ({dead[0]}); restart the server")


def _front_main(cfg: ServeConfig, addresses: tuple[str, str], index: int, sock: socket.socket, core_pid: int,
                ready, go) -> None:
    """API server process `index` (of cfg.api_server_count): HTTP over the engine core front 0 started."""
    child_process_setup(f"trtc-api-server-{index}")
    llm = None
    try:
        llm = AsyncLLM(cfg.model, tp_size=cfg.tp_size, num_fronts=cfg.api_server_count,
                       front=(addresses, index, core_pid))
        run_front(cfg, llm, cfg.api_key or os.environ.get("TRTC_API_KEY") or None,
                  load_chat_template(cfg.chat_template), sock, ready=ready, go=go)
    except TrtcError as e:
        log.error("API server %d: %s", index, e)
        sys.exit(1)
    finally:
        if llm is not None:
            llm.close()
