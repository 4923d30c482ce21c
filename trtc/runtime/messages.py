"""The typed messages between a front (HTTP, tokenization, detokenization) and the engine core that
owns the executor (trtc/runtime/engine_core.py), as msgpack over ZeroMQ (msgspec structs).

    front ──EngineCoreRequest / EngineCoreAbort / EngineCoreControl──▶ engine core
    front ◀──────── EngineCoreOutputs (one per step: every request's new token) ──── engine core

Request ids are the front's (the core maps them to the executor's). `after` names the request whose
prompt this one shares (another sample of it: trtc/runtime/async_engine.py).
"""

from __future__ import annotations

import msgspec

from trtc.runtime.lora import LoRARequest
from trtc.runtime.outputs import PromptLogprobs
from trtc.runtime.sampling_params import SamplingParams


class EngineCoreRequest(msgspec.Struct, tag="add", array_like=True):
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    after: int | None = None
    lora_request: LoRARequest | None = None


class EngineCoreAbort(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[int]


class EngineCoreControl(msgspec.Struct, tag="control", array_like=True):
    command: str  # "abort_all" (every request ends "cancelled") | "shutdown" (abort, close, exit 0)


class EngineCoreOutput(msgspec.Struct, array_like=True):
    """One request's news of one step (the executor's TokenEvent); finish_reason "rejected": the request
    could not be added (error says why)."""

    request_id: int
    token_id: int | None
    logprob: float | None
    finish_reason: str | None = None
    top_logprobs: dict[int, float] | None = None
    error: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # on the request's first output only (TokenEvent's)
    num_cached_tokens: int | None = None


class EngineCoreStats(msgspec.Struct, array_like=True):
    """The scheduler's state after the step (trtc/runtime/async_engine.py EngineStats) and how many
    requests the core has taken from its input so far (the front's admission control counts the rest)."""

    num_running: int
    num_waiting: int
    num_blocks: int
    used_blocks: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_taken: int
    num_steps: int = 0  # steps that ran a batch so far
    num_graph_steps: int = 0  # of them, replayed from a decode CUDA graph (the rest ran eagerly)
    spec_num_drafts: int = 0  # speculation (trtc/runtime/speculative.py SpecStats)
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0


class KvBlockEvent(msgspec.Struct, array_like=True):
    """A block registered for prefix reuse (stored) or a registered block evicted, as the scheduler
    reports them (Scheduler.take_kv_events): for a KV-aware router outside the engine."""

    stored: bool
    block_hash: int  # signed 64-bit
    parent_hash: int | None  # stored: the previous block's hash (None for a sequence's first block)
    token_ids: list[int]  # stored: the block's tokens


class EngineCoreOutputs(msgspec.Struct, tag="outputs", array_like=True):
    step_start: float  # time.monotonic() of the core when the step began (same clock as the front's)
    outputs: list[EngineCoreOutput]
    stats: EngineCoreStats
    kv_events: list[KvBlockEvent] = []  # front 0's, when the core records them (--kv_events)


class EngineCoreReady(msgspec.Struct, tag="ready", array_like=True):
    num_blocks: int
    error: str | None = None  # the engine could not load: why


class EngineCoreDead(msgspec.Struct, tag="dead", array_like=True):
    error: str  # the engine stopped (a broken device or rank); the core exits 1


FrontMessage = EngineCoreRequest | EngineCoreAbort | EngineCoreControl
CoreMessage = EngineCoreOutputs | EngineCoreReady | EngineCoreDead
encoder = msgspec.msgpack.Encoder()
front_decoder = msgspec.msgpack.Decoder(FrontMessage)  # in the core
core_decoder = msgspec.msgpack.Decoder(CoreMessage)  # in the front
