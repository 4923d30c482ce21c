"""The engine core process: owns the Executor and steps it without pause; a front process (the
server: trtc/runtime/engine_client.py) sends requests and aborts and receives one message per step.

    python -m trtc.runtime.engine_core ENGINE_DIR --input ADDR[,ADDR...] --output ADDR[,ADDR...] [--device D] ...

One input and one output address per front (`trtc serve --api_server_count N` runs N front processes
over one core). Front k numbers its requests k, k + N, k + 2N, ..., so a request's outputs go back
to the output of front `request_id % N`. Between steps the core takes every message waiting on its
input (a PULL socket connected to every front), adds and cancels, then steps; after the step it sends
each front its requests' events of the step and the scheduler's statistics in one EngineCoreOutputs
(with --kv_events, front 0's also carries the blocks registered and evicted since the last one).
While nothing runs it waits on its input. A broken device (EngineDeadError) sends EngineCoreDead and exits 1; "shutdown" closes the executor and exits 0; the core ends when its
parent (the front) is gone, so no core outlives its server.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

import msgspec
import zmq

from trtc.errors import TrtcError
from trtc.runtime.executor import Executor
from trtc.runtime.messages import (
    EngineCoreAbort,
    EngineCoreControl,
    EngineCoreDead,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreReady,
    EngineCoreRequest,
    EngineCoreStats,
    encoder,
    front_decoder,
)
from trtc.runtime.speculative import speculative_config

log = logging.getLogger("trtc")
IDLE_POLL_MS = 500  # an idle core looks at its input at least this often


class EngineCore:
    def __init__(self, executor: Executor, input_socket: zmq.Socket, output_sockets: list[zmq.Socket],
                 kv_events: bool = False) -> None:
        self.executor, self.input, self.outputs = executor, input_socket, output_sockets
        self.kv_events = kv_events
        if kv_events:
            executor.scheduler.record_kv_events(True)
        self.live: dict[int, int] = {}  # executor id -> front id
        self.by_front: dict[int, int] = {}  # front id -> executor id
        self.held: list[EngineCoreRequest] = []  # waiting for their `after` request's prompt
        self.prompt_pending: set[int] = set()  # front ids added whose prompt is not computed yet
        self.aborted: set[int] = set()  # front ids aborted before they were added
        self.taken = [0] * len(output_sockets)  # requests taken from each front's input
        self.queries = 0
        self.stopping = False
        self.pending_outputs: list[EngineCoreOutput] = []

    def run(self) -> None:
        ex = self.executor
        while True:
            busy = ex.has_unfinished()
            self._receive(block=not busy and not self.pending_outputs)
            self._admit()
            if self.stopping and not ex.has_unfinished():
                self._send(time.monotonic())
                return
            if not ex.has_unfinished():
                self._send(time.monotonic())
                continue
            start = time.monotonic()
            events = ex.step()
            if not events and ex.scheduler.num_running() == 0 and ex.has_unfinished() and not self.held:
                raise TrtcError("no waiting request fits the KV-cache pool; give the runtime more KV-cache memory")
            for e in events:
                front = self.live.get(e.request_id)
                if front is None:
                    continue
                self.prompt_pending.discard(front)
                if e.finish_reason is not None:
                    del self.live[e.request_id]
                    self.by_front.pop(front, None)
                self.pending_outputs.append(EngineCoreOutput(front, e.token_id, e.logprob, e.finish_reason,
                                                             e.top_logprobs, e.error, e.prompt_logprobs,
                                                             e.num_cached_tokens))
            self._send(start)

    def _receive(self, block: bool) -> None:
        if block and not self.input.poll(IDLE_POLL_MS):
            return
        while True:
            try:
                raw = self.input.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = front_decoder.decode(raw)
            if isinstance(msg, EngineCoreRequest):
                self.held.append(msg)
            elif isinstance(msg, EngineCoreAbort):
                for front in msg.request_ids:
                    rid = self.by_front.get(front)
                    if rid is not None:
                        self.executor.cancel(rid)
                    else:
                        self.aborted.add(front)
            elif isinstance(msg, EngineCoreControl):
                if msg.command == "shutdown":
                    self.stopping = True
                if msg.command in ("abort_all", "shutdown"):
                    self.aborted.update(r.request_id for r in self.held)
                    for rid in list(self.live):
                        self.executor.cancel(rid)

    def _admit(self) -> None:
        held, self.held = self.held, []
        for r in held:
            if r.after is not None and r.after in self.prompt_pending and r.request_id not in self.aborted:
                self.held.append(r)
                continue
            self.taken[r.request_id % len(self.outputs)] += 1
            if r.request_id in self.aborted or self.stopping:
                self.aborted.discard(r.request_id)
                self.pending_outputs.append(EngineCoreOutput(r.request_id, None, None, "cancelled"))
                continue
            try:
                rid = self.executor.add_request(r.prompt_ids, r.params, lora_request=r.lora_request)
            except TrtcError as e:
                self.pending_outputs.append(EngineCoreOutput(r.request_id, None, None, "rejected", error=str(e)))
                continue
            self.live[rid], self.by_front[r.request_id] = r.request_id, rid
            self.prompt_pending.add(r.request_id)
            self.queries += len(r.prompt_ids)

    def stats(self) -> EngineCoreStats:
        """The scheduler's statistics after the step; num_taken is front 0's (_send gives each its own)."""
        s = self.executor.scheduler
        st = s.stats()
        spec = self.executor.spec_stats
        return EngineCoreStats(s.num_running(), s.num_waiting(), st["num_blocks"], st["used_blocks"],
                               st["num_preemptions"], self.queries, st["reused_tokens"], self.taken[0],
                               *self.executor.step_counts(), spec.num_drafts, spec.num_draft_tokens,
                               spec.num_accepted_tokens)

    def _send(self, start: float) -> None:
        """Each front its requests' outputs and the statistics (every front, every step: its gauges stay current)."""
        outputs, self.pending_outputs = self.pending_outputs, []
        n, stats = len(self.outputs), self.stats()
        by_front = [outputs] if n == 1 else [[] for _ in range(n)]
        if n > 1:
            for o in outputs:
                by_front[o.request_id % n].append(o)
        kv_events = self.executor.scheduler.take_kv_events() if self.kv_events else []  # tuples: KvBlockEvent's fields
        for k, socket in enumerate(self.outputs):
            front_stats = stats if k == 0 else msgspec.structs.replace(stats, num_taken=self.taken[k])
            socket.send(encoder.encode(EngineCoreOutputs(start, by_front[k], front_stats, kv_events if k == 0 else [])))


def child_process_setup(name: str) -> None:
    """In a process that a front started (the engine core, another API server): trtc's lines on stderr,
    and an exit as soon as its parent is gone, so that no such process outlives the server."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[trtc] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name=f"{name}-parent", daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("engine_dir")
    ap.add_argument("--input", required=True, help="the fronts' input addresses, comma-separated")
    ap.add_argument("--output", required=True, help="their output addresses, in the same order")
    ap.add_argument("--device", default=None)
    ap.add_argument("--kv_cache_free_gpu_memory_fraction", type=float, default=0.9)
    ap.add_argument("--kv_cache_max_tokens", type=int, default=None)
    ap.add_argument("--kv_events", action="store_true", help="send front 0 the blocks registered and evicted")
    ap.add_argument("--speculative_decoding_mode", default=None)
    ap.add_argument("--max_draft_len", type=int, default=None)
    ap.add_argument("--draft_engine_dir", default=None)
    ap.add_argument("--max_loras", type=int, default=0, help="LoRA adapter slots (0: none)")
    ap.add_argument("--max_lora_rank", type=int, default=16)
    args = ap.parse_args(argv)
    child_process_setup("trtc-core")
    ctx = zmq.Context()
    input_socket = ctx.socket(zmq.PULL)
    for address in args.input.split(","):
        input_socket.connect(address)
    output_sockets = []
    for address in args.output.split(","):
        output_sockets.append(ctx.socket(zmq.PUSH))
        output_sockets[-1].setsockopt(zmq.SNDHWM, 0)
        output_sockets[-1].setsockopt(zmq.LINGER, 5000)
        output_sockets[-1].connect(address)

    def tell_all(msg) -> None:
        for socket in output_sockets:
            socket.send(encoder.encode(msg))

    try:
        spec = speculative_config(args.speculative_decoding_mode, args.max_draft_len, args.draft_engine_dir)
        executor = Executor(args.engine_dir, args.device, args.kv_cache_max_tokens,
                            args.kv_cache_free_gpu_memory_fraction, speculative_config=spec, max_loras=args.max_loras,
                            max_lora_rank=args.max_lora_rank)
    except TrtcError as e:
        tell_all(EngineCoreReady(0, str(e)))
        return 1
    tell_all(EngineCoreReady(executor.num_blocks))
    core = EngineCore(executor, input_socket, output_sockets, args.kv_events)
    try:
        core.run()
    except BaseException as e:  # noqa: BLE001 - the fronts hear why, then this process ends
        log.exception("engine core stopped")
        tell_all(EngineCoreDead(f"{type(e).__name__}: {e}"))
        for socket in output_sockets:
            socket.close()
        os._exit(1)  # the device may be broken: no orderly teardown
    executor.close()
    for socket in output_sockets:
        socket.close()
    input_socket.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
