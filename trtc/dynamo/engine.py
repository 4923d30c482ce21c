"""The Dynamo worker: Dynamo's LLMEngine contract over trtc's engine core.

`from_args` parses the worker's flags (Dynamo's names for Dynamo's settings); `start` loads the engine
in its core process (trtc/serve/async_llm.py, as behind `trtc serve`) and registers its limits
(context length, KV block size and count, batch limits); `generate` streams each step's new token ids;
`abort` cancels a request whose client left (its blocks are freed at the core's next step); the KV
events of the core go to Dynamo's publisher, the load (KV blocks in use, prefix-cache hit rate) to
its snapshot publisher after each step, and trtc's Prometheus metrics (vLLM's names under `trtc:`)
to the worker's `/metrics` (Dynamo's system port, DYN_SYSTEM_PORT).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from dynamo.common.backend import EngineConfig, LLMEngine, LlmRegistration, WorkerConfig
from dynamo.common.backend.metrics import register_engine_registry
from dynamo.common.backend.publisher import ComponentSnapshot, PushSource
from dynamo.llm.exceptions import EngineShutdown, InvalidArgument

from trtc.dynamo.kv_events import publisher_calls
from trtc.dynamo.requests import finish_reason, logprob_fields, sampling_params, usage
from trtc.errors import TrtcError
from trtc.llm import resolve_engine_dir
from trtc.runtime.async_engine import EngineDead
from trtc.runtime.messages import KvBlockEvent
from trtc.runtime.request_stream import RequestStream
from trtc.serve.async_llm import AsyncLLM
from trtc.serve.metrics import ServerMetrics

log = logging.getLogger("trtc")
SNAPSHOT_INTERVAL_S = 0.05  # the load is published at most this often


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m trtc.dynamo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", "--engine_dir", dest="model", required=True,
                    help="an engine directory, or an HF model directory or id (built once, then cached)")
    ap.add_argument("--served-model-name", default=None, help="the name clients send (default: --model)")
    ap.add_argument("--tp_size", type=int, default=1)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if there is a GPU)")
    ap.add_argument("--kv-cache-free-gpu-memory-fraction", type=float, default=0.9)
    ap.add_argument("--kv-cache-max-tokens", "--max_tokens_in_paged_kv_cache", dest="kv_cache_max_tokens", type=int,
                    default=None, help="tokens the paged KV cache holds (default: as `trtc run`)")
    ap.add_argument("--namespace", default="dynamo")
    ap.add_argument("--component", default="trtc")
    ap.add_argument("--endpoint", default="generate")
    ap.add_argument("--endpoint-types", default="chat,completions")
    ap.add_argument("--discovery-backend", default="etcd", help="etcd, file (DYN_FILE_KV) or kubernetes")
    ap.add_argument("--request-plane", default="tcp")
    ap.add_argument("--event-plane", default=None)
    ap.add_argument("--custom-jinja-template", default=None,
                    help="a chat template file for the frontend, for a model whose tokenizer has none")
    ap.add_argument("--tool-call-parser", default=None, help="the frontend's tool-call parser (Dynamo's names)")
    ap.add_argument("--reasoning-parser", default=None, help="the frontend's reasoning parser (Dynamo's names)")
    ap.add_argument("--disable-kv-routing", action="store_true",
                    help="publish no KV events or load (the router then cannot route by prefix)")
    return ap.parse_args(argv)


def model_path(engine_dir: Path) -> str:
    """Where the frontend reads the tokenizer and chat template: the engine directory's copy of them."""
    return str(engine_dir / "tokenizer") if (engine_dir / "tokenizer").is_dir() else str(engine_dir)


class TrtcEngine(LLMEngine):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.llm: AsyncLLM | None = None
        self.metrics: ServerMetrics | None = None
        self.streams: dict[str, RequestStream] = {}  # Dynamo context id -> its request
        self._kv_publisher = None
        self._snapshot_publisher = None
        self._last_snapshot = 0.0

    @classmethod
    async def from_args(cls, argv: list[str] | None = None) -> tuple[TrtcEngine, WorkerConfig]:
        args = parse_args(argv)
        try:  # an HF model is built here, once (then cached)
            args.engine_dir = await asyncio.to_thread(resolve_engine_dir, args.model, args.tp_size)
        except TrtcError as e:
            raise SystemExit(f"trtc.dynamo: {e}") from None
        name = args.served_model_name or args.model
        config = WorkerConfig(
            namespace=args.namespace, component=args.component, endpoint=args.endpoint, model_name=model_path(args.engine_dir),
            served_model_name=name, endpoint_types=args.endpoint_types, discovery_backend=args.discovery_backend,
            request_plane=args.request_plane, event_plane=args.event_plane,
            custom_jinja_template=args.custom_jinja_template, tool_call_parser=args.tool_call_parser,
            reasoning_parser=args.reasoning_parser, enable_kv_routing=not args.disable_kv_routing,
        )
        return cls(args), config

    async def start(self, worker_id: int) -> EngineConfig:
        a = self.args
        try:  # loads the engine in the core process: off the loop, which serves Dynamo meanwhile
            self.llm = await asyncio.to_thread(
                AsyncLLM, a.engine_dir, tp_size=a.tp_size, kv_cache_free_gpu_memory_fraction=a.kv_cache_free_gpu_memory_fraction,
                kv_cache_max_tokens=a.kv_cache_max_tokens, device=a.device, kv_events=not a.disable_kv_routing)
        except TrtcError as e:
            raise EngineShutdown(str(e)) from e
        client = self.llm.start_async_engine()
        client.on_kv_events = self._publish_kv_events
        name = a.served_model_name or a.model
        self.metrics = ServerMetrics(lambda: client.stats, name)
        bc = self.llm.engine.build_config
        log.info("trtc worker %s: engine %s, %d KV blocks of %d tokens", worker_id, self.llm.engine_dir,
                 self.llm.num_blocks, bc.tokens_per_block)
        return EngineConfig(
            model=model_path(self.llm.engine_dir), served_model_name=name,
            llm=LlmRegistration(context_length=bc.max_seq_len, kv_cache_block_size=bc.tokens_per_block,
                                total_kv_blocks=self.llm.num_blocks, max_num_seqs=bc.max_batch_size,
                                max_num_batched_tokens=bc.max_num_tokens),
        )

    async def generate(self, request: dict[str, Any], context) -> AsyncGenerator[dict[str, Any], None]:
        llm = self.llm
        prompt = [int(t) for t in request.get("token_ids") or []]
        try:
            params = sampling_params(request, llm.max_seq_len)
            stream = llm.generate_async(prompt, params)
        except EngineDead as e:
            raise EngineShutdown(str(e)) from e
        except TrtcError as e:
            raise InvalidArgument(str(e)) from e
        key = context.id()
        self.streams[key] = stream
        num_tokens, reason = 0, None
        try:
            async for delta in stream.deltas():
                c = delta.outputs[0]
                num_tokens += len(c.token_ids)
                chunk: dict[str, Any] = {"token_ids": c.token_ids, "index": 0}
                if c.logprobs is not None and c.token_ids:
                    chunk.update(logprob_fields(c.logprobs, c.top_logprobs, c.token_ids, self._token_text))
                if delta.finished:
                    reason = c.finish_reason
                    if reason == "error":
                        raise TrtcError(delta.error or "the engine failed the request")
                    chunk["finish_reason"] = finish_reason(reason)
                    chunk["completion_usage"] = usage(len(prompt), num_tokens, delta.num_cached_tokens)
                yield chunk
        except EngineDead as e:
            raise EngineShutdown(str(e)) from e
        except TrtcError as e:
            if num_tokens:  # failed mid-stream (its step failed): Dynamo's Unknown
                raise
            raise InvalidArgument(str(e)) from e  # refused: a 400 from the frontend
        finally:
            del self.streams[key]
            # reason None: Dynamo closed the stream (its client left); the request was aborted
            self.metrics.record(stream, "abort" if reason in (None, "cancelled", "error") else finish_reason(reason))
            self._publish_snapshot()

    async def abort(self, context) -> None:
        stream = self.streams.get(context.id())
        if stream is not None:
            stream.abort()

    async def cleanup(self) -> None:
        if self.llm is not None:
            llm, self.llm = self.llm, None
            await asyncio.to_thread(llm.close)

    # KV events and load ----------------------------------------------------------------------------
    async def kv_event_sources(self) -> list[PushSource]:
        return [] if self.args.disable_kv_routing else [PushSource(on_ready=self._kv_ready, dp_rank=0)]

    def _kv_ready(self, publisher) -> None:
        self._kv_publisher = publisher

    def _publish_kv_events(self, events: list[KvBlockEvent]) -> None:
        if self._kv_publisher is not None:
            for method, kwargs in publisher_calls(events):
                getattr(self._kv_publisher, method)(**kwargs)
        self._publish_snapshot()

    def component_metrics_dp_ranks(self) -> list[int]:
        return [0]

    def attach_snapshot_publisher(self, publisher) -> None:
        self._snapshot_publisher = publisher

    def _publish_snapshot(self) -> None:
        now = time.monotonic()
        if self._snapshot_publisher is None or self.llm is None or now - self._last_snapshot < SNAPSHOT_INTERVAL_S:
            return
        self._last_snapshot = now
        s = self.llm.async_engine.stats
        hit_rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else None
        self._snapshot_publisher.publish(0, ComponentSnapshot(kv_used_blocks=s.used_blocks, kv_total_blocks=s.num_blocks,
                                                              gpu_cache_usage=s.kv_cache_usage, dp_rank=0,
                                                              kv_cache_hit_rate=hit_rate))

    async def register_prometheus(self, metrics) -> None:
        if self.metrics is not None:
            register_engine_registry(metrics, self.metrics.registry, prefix_filters=["trtc:"])

    def _token_text(self, token_id: int) -> str:
        return self.llm.tokenizer.decode([token_id])
