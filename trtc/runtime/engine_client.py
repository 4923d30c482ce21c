"""The front's handle on an engine core process (trtc/runtime/engine_core.py): AsyncEngine's
interface (submit / abort / abort_all / stats / alive / num_waiting / close) over ZeroMQ.

    front (asyncio) ──submit / abort──▶ PUSH ──▶ engine core process: Executor.step() without pause
    front (asyncio) ◀── reader task ◀── PULL ◀── one EngineCoreOutputs per step

The reader task runs on the asyncio loop and hands each request its events of the step (the
RequestHandle events of trtc/runtime/async_engine.py), so the server's handlers and RequestStream
work unchanged. The core starts with the client, loads the engine, and says ready (or why not);
it ends with close() ("shutdown": in-flight requests cancelled, the executor closed), with the
front process (it watches its parent), or on a broken device (EngineCoreDead: the client's
requests fail with EngineDead and `on_dead` is called).

Several fronts can share one core (`trtc serve --api_server_count N`): the client that starts it
(front 0, num_fronts N) makes an input and an output address for each; front k > 0 is an
EngineClient.attach_front(addresses[k], k, N) in a process of its own, and owns no core process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import zmq
import zmq.asyncio

from trtc.errors import TrtcError
from trtc.runtime.async_engine import EngineDead, EngineStats, RequestHandle
from trtc.runtime.lora import LoRARequest
from trtc.runtime.messages import (
    EngineCoreAbort,
    EngineCoreControl,
    EngineCoreDead,
    EngineCoreOutputs,
    EngineCoreReady,
    EngineCoreRequest,
    core_decoder,
    encoder,
)
from trtc.runtime.outputs import TokenEvent
from trtc.runtime.sampling_params import SamplingParams
from trtc.runtime.speculative import SpeculativeConfig

log = logging.getLogger("trtc")
CORE_EXIT_S = 60.0  # close(): how long the core may take to cancel, free the device and stop its ranks


class EngineClient:
    """Starts the engine core process for `engine_dir` and waits until it has loaded the engine (raises
    TrtcError with the core's reason if it cannot). attach() on the asyncio loop before submit()."""

    def __init__(self, engine_dir: str | Path, device: str | None = None, kv_cache_free_gpu_memory_fraction: float = 0.9,
                 kv_cache_max_tokens: int | None = None, startup_s: float = 3600.0, num_fronts: int = 1,
                 kv_events: bool = False, speculative_config: SpeculativeConfig | None = None, max_loras: int = 0,
                 max_lora_rank: int = 16) -> None:
        self._dir = tempfile.mkdtemp(prefix="trtc-core-")
        self.addresses = [(f"ipc://{self._dir}/input-{k}", f"ipc://{self._dir}/output-{k}") for k in range(num_fronts)]
        self._bind(self.addresses[0], 0, num_fronts)
        cmd = [sys.executable, "-m", "trtc.runtime.engine_core", str(engine_dir),
               "--input", ",".join(a for a, _ in self.addresses), "--output", ",".join(b for _, b in self.addresses),
               "--kv_cache_free_gpu_memory_fraction", str(kv_cache_free_gpu_memory_fraction)]
        cmd += ["--device", str(device)] if device is not None else []
        cmd += ["--kv_cache_max_tokens", str(kv_cache_max_tokens)] if kv_cache_max_tokens is not None else []
        cmd += ["--kv_events"] if kv_events else []
        if max_loras:
            cmd += ["--max_loras", str(max_loras), "--max_lora_rank", str(max_lora_rank)]
        if speculative_config is not None:
            cmd += ["--speculative_decoding_mode", speculative_config.mode,
                    "--max_draft_len", str(speculative_config.max_draft_len)]
            if speculative_config.draft_engine_dir is not None:
                cmd += ["--draft_engine_dir", str(speculative_config.draft_engine_dir)]
        env = {**os.environ, "PYTHONPATH": _python_path()}
        if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu"):
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the core's idle threads must not spin on the front's cores
        self.process: subprocess.Popen | None = subprocess.Popen(cmd, env=env)
        self._ready(startup_s)

    @classmethod
    def attach_front(cls, addresses: tuple[str, str], index: int, core_pid: int, num_fronts: int,
                     startup_s: float = 3600.0) -> EngineClient:
        """Front `index` of `num_fronts` over the core (process `core_pid`) that front 0 started."""
        self = cls.__new__(cls)
        self._dir = None
        self._bind(addresses, index, num_fronts)
        self.process, self._core_pid = None, core_pid
        self._ready(startup_s)
        return self

    def _bind(self, addresses: tuple[str, str], index: int, num_fronts: int) -> None:
        self._ctx = zmq.Context()
        self._input = self._ctx.socket(zmq.PUSH)  # sends happen on one thread (the loop's, or before it)
        self._input.setsockopt(zmq.SNDHWM, 0)
        self._input.setsockopt(zmq.LINGER, 2000)
        self._input.bind(addresses[0])
        self._output = self._ctx.socket(zmq.PULL)
        self._output.setsockopt(zmq.RCVHWM, 0)
        self._output.bind(addresses[1])
        self.error: BaseException | None = None
        self.on_dead = None  # called on the asyncio loop once the engine core has stopped on an error
        self.on_kv_events = None  # with kv_events: called on the loop with each step's list of KvBlockEvent
        self.stats = EngineStats()
        self._live: dict[int, RequestHandle] = {}  # front id -> handle, until its last event
        self._next_id, self._id_step = index, num_fronts  # this front's ids: index, index + N, ...
        self._submitted = 0
        self._taken = 0
        self._closed = False
        self._reader: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def _ready(self, startup_s: float) -> None:
        ready = self._wait_ready(startup_s)
        self.num_blocks = ready.num_blocks
        self.stats = EngineStats(num_blocks=ready.num_blocks)

    def _exit_status(self) -> str:
        return f" with status {self.process.returncode}" if self.process is not None else f" (pid {self._core_pid})"

    def _core_exited(self) -> bool:
        if self.process is not None:
            return self.process.poll() is not None
        try:  # another front's child: gone, or a zombie its parent has not reaped yet
            os.kill(self._core_pid, 0)
            return Path(f"/proc/{self._core_pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (ProcessLookupError, FileNotFoundError):
            return True

    def _wait_ready(self, timeout: float) -> EngineCoreReady:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._output.poll(200):
                msg = core_decoder.decode(self._output.recv())
                if isinstance(msg, EngineCoreReady):
                    if msg.error is not None:
                        self._stop_process(30)
                        self._close_sockets()
                        raise TrtcError(msg.error)
                    return msg
            if self._core_exited():
                self._close_sockets()
                raise TrtcError(f"the engine core process exited{self._exit_status()} while loading "
                                "the engine; see its lines above")
        self._stop_process(0)
        self._close_sockets()
        raise TrtcError(f"the engine core did not load the engine in {timeout:.0f} s")

    # asyncio side ---------------------------------------------------------------------------------
    def attach(self) -> None:
        """Start reading the core's outputs on the running asyncio loop."""
        if self._reader is None:
            self.loop = asyncio.get_running_loop()
            self._reader = self.loop.create_task(self._read())

    @property
    def alive(self) -> bool:
        return self.error is None and not self._closed and not self._core_exited()

    def num_waiting(self) -> int:
        """Requests not yet running: queued in the core's scheduler or not yet taken by the core."""
        return self.stats.num_waiting + max(0, self._submitted - self._taken)

    def submit(self, prompt_ids: list[int], params: SamplingParams, after: RequestHandle | None = None,
               lora_request: LoRARequest | None = None) -> RequestHandle:
        if not self.alive:
            raise EngineDead(f"the engine stopped on an error ({self.error}); restart the server")
        self.attach()
        handle = RequestHandle(prompt_ids, params, after, lora_request)
        handle.request_id = self._next_id
        self._next_id += self._id_step
        self._live[handle.request_id] = handle
        self._submitted += 1
        self._input.send(encoder.encode(EngineCoreRequest(handle.request_id, prompt_ids, params,
                                                          None if after is None else after.request_id, lora_request)),
                         copy=False)
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Cancel the request in the core; its blocks are freed at the core's next step boundary."""
        if not handle.aborted and handle.request_id in self._live and not self._closed:
            handle.aborted = True
            self._input.send(encoder.encode(EngineCoreAbort([handle.request_id])))

    def abort_all(self) -> None:
        """Shutdown: every request (every front's) ends (finish reason "cancelled") at the core's next step."""
        if not self._closed and not self._core_exited():
            self._input.send(encoder.encode(EngineCoreControl("abort_all")))

    def close(self, timeout: float = CORE_EXIT_S) -> None:
        """Stop the core (after cancelling what runs): it frees the device and exits. A front that did
        not start the core only closes its sockets."""
        if self._closed:
            return
        self._closed = True
        if self.process is not None and self.process.poll() is None:
            try:
                self._input.send(encoder.encode(EngineCoreControl("shutdown")))
            except zmq.ZMQError:
                pass
        self._stop_process(timeout)
        if self._reader is not None and self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._reader.cancel)
        self._close_sockets()

    def _stop_process(self, timeout: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the engine core did not stop in %.0f s; killing it", timeout)
            self.process.kill()
            self.process.wait()

    def _close_sockets(self) -> None:
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._ctx.term()
        if self._dir is not None:  # front 0's: every front's socket files
            for address in (a for pair in self.addresses for a in pair):
                Path(address.removeprefix("ipc://")).unlink(missing_ok=True)
            os.rmdir(self._dir) if os.path.isdir(self._dir) else None

    async def _read(self) -> None:
        socket = zmq.asyncio.Socket.from_socket(self._output)
        try:
            while True:
                if not await socket.poll(500):
                    if self._core_exited() and not self._closed:
                        self._die(f"the engine core process exited{self._exit_status()}")
                        return
                    continue
                msg = core_decoder.decode(await socket.recv(copy=False))
                if isinstance(msg, EngineCoreOutputs):
                    self._deliver(msg)
                elif isinstance(msg, EngineCoreDead):
                    self._die(msg.error)
                    return
        except asyncio.CancelledError:
            pass

    def _deliver(self, msg: EngineCoreOutputs) -> None:
        s = msg.stats
        self._taken = s.num_taken
        self.stats = replace(self.stats, num_running=s.num_running, num_waiting=s.num_waiting, num_blocks=s.num_blocks,
                             used_blocks=s.used_blocks, num_preemptions=s.num_preemptions,
                             prefix_cache_queries=s.prefix_cache_queries, prefix_cache_hits=s.prefix_cache_hits,
                             num_steps=s.num_steps, num_graph_steps=s.num_graph_steps,
                             spec_num_drafts=s.spec_num_drafts, spec_num_draft_tokens=s.spec_num_draft_tokens,
                             spec_num_accepted_tokens=s.spec_num_accepted_tokens)
        if msg.kv_events and self.on_kv_events is not None:
            self.on_kv_events(msg.kv_events)
        start = msg.step_start
        for o in msg.outputs:
            h = self._live.get(o.request_id)
            if h is None:
                continue
            h.prompt_done = True
            if o.finish_reason == "rejected":
                del self._live[o.request_id]
                h.events.put_nowait(TrtcError(o.error or "the engine refused the request"))
                continue
            if o.finish_reason is not None:
                del self._live[o.request_id]
            h.events.put_nowait([(TokenEvent(o.request_id, o.token_id, o.logprob, o.finish_reason, o.top_logprobs,
                                             o.error, o.prompt_logprobs, o.num_cached_tokens), start)])

    def _die(self, reason: str) -> None:
        log.error("the engine core stopped: %s", reason)
        self.error = EngineDead(reason)
        self.stats = replace(self.stats, engine_dead=True)
        err = EngineDead(f"the engine stopped on an error ({reason}); restart the server")
        for h in self._live.values():
            h.events.put_nowait(err)
        self._live.clear()
        if self.on_dead is not None:
            self.on_dead()


def _python_path() -> str:
    """The front's import path for the core (so it runs the same trtc)."""
    root = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
