"""The async engine: one thread owns the executor and steps it; asyncio tasks submit and abort.

    asyncio task ──submit──▶ queue.Queue ──┐              ┌──▶ loop.call_soon_threadsafe(dispatch)
    asyncio task ──abort───▶ queue.Queue ──┴─▶ engine thread: drain at the step boundary, step()
                                                             └──▶ per-request asyncio.Queue of events

The engine thread only adds, cancels and steps (token ids in, token events out): tokenization and
detokenization happen on the asyncio side, off the step loop. A cancelled request's KV blocks go back
to the pool at once (Scheduler.cancel); its last event ("cancelled") comes with the next step.
After each step the thread publishes the scheduler's statistics (`EngineStats`) for metrics and
admission control; nothing else reads the scheduler from another thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, replace

from trtc.errors import TrtcError
from trtc.runtime.executor import Executor
from trtc.runtime.lora import LoRARequest
from trtc.runtime.outputs import TokenEvent
from trtc.runtime.sampling_params import SamplingParams

log = logging.getLogger("trtc")
IDLE_WAIT_S = 0.5  # the idle engine thread wakes at least this often (to see shutdown)


@dataclass(frozen=True)
class EngineStats:
    """The scheduler's state after the last step (counters are cumulative since start)."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0
    used_blocks: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens admitted
    prefix_cache_hits: int = 0  # of those, tokens served from cached KV blocks
    num_steps: int = 0  # steps that ran a batch
    num_graph_steps: int = 0  # of them, replayed from a decode CUDA graph (the rest ran eagerly)
    spec_num_drafts: int = 0  # speculation: request-steps that fed a draft, its tokens, of them accepted
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    engine_dead: bool = False  # the device (or a rank) broke: nothing runs any more

    @property
    def kv_cache_usage(self) -> float:
        return self.used_blocks / self.num_blocks if self.num_blocks else 0.0


class EngineDead(TrtcError):
    """The engine thread stopped on an error; no request can run any more."""


class RequestHandle:
    """The asyncio side of one request: its events arrive on `events` as lists (one per step) of
    (TokenEvent, step start time); an exception instead means the request failed."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, after: RequestHandle | None = None,
                 lora_request: LoRARequest | None = None) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.lora_request = lora_request
        self.events: asyncio.Queue = asyncio.Queue()
        self.request_id: int | None = None  # the executor's id, set by the engine thread
        self.arrival = time.monotonic()
        self.aborted = False
        self.after = after  # admitted only once that request's prompt is computed (its blocks cached)
        self.prompt_done = False  # its first token came, or it ended (engine thread)


class AsyncEngine:
    """Steps `executor` on its own thread for requests from the asyncio loop that created it."""

    def __init__(self, executor: Executor, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.executor = executor
        self.loop = loop or asyncio.get_running_loop()
        self._submits: queue.SimpleQueue[RequestHandle] = queue.SimpleQueue()
        self._aborts: queue.SimpleQueue[RequestHandle] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._abort_all = False
        self._pending = 0  # submitted, not yet taken by the engine thread (asyncio side writes, engine reads)
        self._taken = 0
        self.error: BaseException | None = None
        self.on_dead = None  # called on the asyncio loop once the engine has stopped on an error
        self.stats = EngineStats(num_blocks=executor.num_blocks)
        self._live: dict[int, RequestHandle] = {}  # executor id -> handle (engine thread only)
        self._held: list[RequestHandle] = []  # taken, waiting for their `after` request's prompt (engine thread)
        self._thread = threading.Thread(target=self._loop, name="trtc-engine", daemon=True)
        self._thread.start()

    # asyncio side ---------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def num_waiting(self) -> int:
        """Requests not yet running: queued in the scheduler or not yet taken from the submit queue."""
        return self.stats.num_waiting + max(0, self._pending - self._taken)

    def submit(self, prompt_ids: list[int], params: SamplingParams, after: RequestHandle | None = None,
               lora_request: LoRARequest | None = None) -> RequestHandle:
        """after: a request on the same prompt (another sample of it): this one waits until that one's
        prompt is computed, then finds every full prompt block in the prefix cache instead of
        computing it again. lora_request: its LoRA adapter."""
        if not self.alive:
            raise EngineDead(f"the engine stopped on an error ({self.error}); restart the server")
        handle = RequestHandle(prompt_ids, params, after, lora_request)
        self._pending += 1
        self._submits.put(handle)
        self._wake.set()
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Cancel the request at the next step boundary; its KV blocks are freed then."""
        if not handle.aborted:
            handle.aborted = True
            self._aborts.put(handle)
            self._wake.set()

    def abort_all(self) -> None:
        """Shutdown: every request ends (finish reason "cancelled") at the next step boundary."""
        self._abort_all = True
        self._wake.set()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the engine thread (after aborting what runs); the executor stays open."""
        self._abort_all = self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    # Engine thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        ex = self.executor
        try:
            while True:
                self._drain()
                if not ex.has_unfinished():
                    if self._stopping:
                        return
                    self._publish()
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                start = time.monotonic()
                events = ex.step()
                if (not events and ex.scheduler.num_running() == 0 and ex.has_unfinished() and self._submits.empty()
                        and not self._held):
                    raise TrtcError("no waiting request fits the KV-cache pool; give the runtime more KV-cache memory")
                self._publish()  # before the events: a request that sees its end sees the stats after it
                self._dispatch(events, start)
        except BaseException as e:  # noqa: BLE001 - the engine is dead: every request hears why
            log.exception("engine thread stopped")
            self.error = e
            failed = list(self._live.values()) + self._held
            while not self._submits.empty():
                failed.append(self._submits.get())
            self.stats = replace(self.stats, engine_dead=True)
            err = EngineDead(f"the engine stopped on an error ({e}); restart the server")
            for h in failed:
                self._post(h.events.put_nowait, err)
            if self.on_dead is not None:
                self._post(self.on_dead)

    def _drain(self) -> None:
        ex = self.executor
        while not self._submits.empty():
            self._held.append(self._submits.get())
        held, self._held = self._held, []
        for h in held:
            if h.after is not None and not h.after.prompt_done and not (h.aborted or self._abort_all):
                self._held.append(h)
                continue
            self._taken += 1
            if h.aborted or self._abort_all:
                h.prompt_done = True
                self._post(h.events.put_nowait, [(TokenEvent(-1, None, None, "cancelled"), 0.0)])
                continue
            try:
                h.request_id = ex.add_request(h.prompt_ids, h.params, lora_request=h.lora_request)
            except TrtcError as e:
                h.prompt_done = True
                self._post(h.events.put_nowait, e)
                continue
            self._live[h.request_id] = h
            self.stats = replace(self.stats, prefix_cache_queries=self.stats.prefix_cache_queries + len(h.prompt_ids))
        if self._abort_all:
            self._abort_all = self._stopping  # abort_all() is one-shot; close() keeps refusing
            for rid in list(self._live):
                ex.cancel(rid)
        while not self._aborts.empty():
            h = self._aborts.get()
            if h.request_id is not None and h.request_id in self._live:
                ex.cancel(h.request_id)

    def _dispatch(self, events: list[TokenEvent], start: float) -> None:
        """Hand each request its events of this step, in one call onto the asyncio loop."""
        by_request: dict[RequestHandle, list] = defaultdict(list)
        for e in events:
            h = self._live.get(e.request_id)
            if h is None:
                continue
            by_request[h].append((e, start))
            h.prompt_done = True
            if e.finish_reason is not None:
                del self._live[e.request_id]
        if by_request:
            self._post(_deliver, by_request)

    def _post(self, fn, *args) -> None:
        """Run fn(*args) on the asyncio loop; once that loop is closed nobody listens: stop."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed
            self._abort_all = self._stopping = True

    def _publish(self) -> None:
        s = self.executor.scheduler
        st = s.stats()
        steps, graph_steps = self.executor.step_counts()
        spec = self.executor.spec_stats
        self.stats = replace(
            self.stats, num_running=s.num_running(), num_waiting=s.num_waiting(), num_blocks=st["num_blocks"],
            used_blocks=st["used_blocks"], num_preemptions=st["num_preemptions"],
            prefix_cache_hits=st["reused_tokens"], num_steps=steps, num_graph_steps=graph_steps,
            spec_num_drafts=spec.num_drafts, spec_num_draft_tokens=spec.num_draft_tokens,
            spec_num_accepted_tokens=spec.num_accepted_tokens,
        )


def _deliver(by_request: dict[RequestHandle, list]) -> None:
    for h, events in by_request.items():
        h.events.put_nowait(events)
