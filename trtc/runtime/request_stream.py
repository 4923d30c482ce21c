"""One async request's output: an async iterator of partial outputs and an awaitable final one.

`async for out in stream` yields a snapshot of the RequestOutput each time it gains text or ends;
`await stream` (or `await stream.aresult()`) returns the finished output; `stream.deltas()` yields
outputs holding only what is new (the server's SSE chunks; the steps that arrived while its consumer
was busy come as one delta, so a loaded server sends fewer, larger chunks rather than fall behind).
Detokenization happens here, on the asyncio side, with the incremental Detokenizer; a stop string
found in the text aborts the request in the engine (finish reason "stop"). Leaving an iteration
early (break, a cancelled task) aborts the request too, so its KV blocks go back to the pool.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from trtc.runtime.async_engine import AsyncEngine, RequestHandle
from trtc.runtime.detokenizer import Detokenizer
from trtc.runtime.outputs import RequestOutput, new_completion


@dataclass
class RequestTimes:
    """When things happened to one request (time.monotonic seconds), for latency metrics."""

    arrival: float
    first_step: float | None = None  # start of the step that produced the first token
    token_times: list[float] = field(default_factory=list)  # arrival of each output token on the loop
    finished: float | None = None


class RequestStream:
    def __init__(self, engine: AsyncEngine, handle: RequestHandle, prompt: str | None,
                 detokenizer: Detokenizer | None) -> None:
        self._engine = engine
        self.handle = handle
        self._detok = detokenizer
        params = handle.params
        self.output = RequestOutput(-1, prompt, handle.prompt_ids,
                                    [new_completion(params)])
        self.times = RequestTimes(handle.arrival)

    @property
    def finished(self) -> bool:
        return self.output.finished

    def abort(self) -> None:
        """Cancel the request; the stream then ends with finish reason "cancelled"."""
        self._engine.abort(self.handle)

    async def deltas(self) -> AsyncIterator[RequestOutput]:
        """Yield, after each step that changed the request, an output with only the new text,
        token ids and logprobs (finish_reason set on the last). Raises the engine's error (a
        TrtcError) if the request was rejected or the engine died."""
        c = self.output.outputs[0]
        try:
            events = self.handle.events
            while not self.output.finished:
                items = [await events.get()]
                while not events.empty():  # steps that came while the consumer was busy: one delta for all
                    items.append(events.get_nowait())
                n_tokens, n_text, error = len(c.token_ids), len(c.text), None
                for item in items:
                    if isinstance(item, BaseException):
                        error = item  # raised after the delta of the steps before it
                        break
                    for event, step_start in item:
                        self._add(event, step_start)
                        if self.output.finished:
                            break
                    if self.output.finished:
                        break
                new = replace(c, text=c.text[n_text:], token_ids=c.token_ids[n_tokens:],
                              logprobs=None if c.logprobs is None else c.logprobs[n_tokens:],
                              top_logprobs=None if c.top_logprobs is None else c.top_logprobs[n_tokens:])
                self.output.request_id = self.handle.request_id if self.handle.request_id is not None else -1
                if new.text or new.token_ids or self.output.finished:
                    yield replace(self.output, outputs=[new])
                if error is not None:
                    raise error
        finally:
            if not self.output.finished:  # the consumer left early: free the request's blocks
                self.abort()

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        async for _ in self.deltas():
            yield snapshot(self.output)

    async def aresult(self) -> RequestOutput:
        async for _ in self.deltas():
            pass
        return self.output

    def __await__(self):
        return self.aresult().__await__()

    def _add(self, event, step_start: float) -> None:
        c, now = self.output.outputs[0], time.monotonic()
        if event.num_cached_tokens is not None:  # the request's first event
            self.output.prompt_logprobs, self.output.num_cached_tokens = event.prompt_logprobs, event.num_cached_tokens
        if event.token_id is not None:
            if self.times.first_step is None:
                self.times.first_step = step_start
            self.times.token_times.append(now)
            c.token_ids.append(event.token_id)
            if c.logprobs is not None:
                c.logprobs.append(event.logprob)
            if c.top_logprobs is not None:
                c.top_logprobs.append(event.top_logprobs or {})
            if self._detok is not None:
                self._detok.push([event.token_id])
        reason = event.finish_reason
        if self._detok is not None:
            if reason is not None:
                self._detok.flush()
            c.text = self._detok.text
            if self._detok.stopped:  # a stop string ends the request; the text is cut before it
                if reason is None:
                    self.abort()
                reason = "stop"
        if reason is not None:
            c.finish_reason, self.output.finished = reason, True
            self.output.error = event.error
            self.times.finished = now


def snapshot(out: RequestOutput) -> RequestOutput:
    """A copy of `out` that later tokens do not change (the text is shared: strings are immutable)."""
    outputs = [replace(c, token_ids=list(c.token_ids), logprobs=None if c.logprobs is None else list(c.logprobs),
                       top_logprobs=None if c.top_logprobs is None else list(c.top_logprobs))
               for c in out.outputs]
    return replace(out, outputs=outputs)
