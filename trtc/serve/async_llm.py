"""The server's front: tokenizer, detokenization and request streams, with the engine in an engine
core process of its own (trtc/runtime/engine_client.py), as vLLM's AsyncLLM / EngineCore.

It has the LLM methods the handlers use (tokenizer, check_prompt, generate_async, start_async_engine,
async_engine, max_seq_len, num_blocks, guided_decoder, close); the weights, the KV pool and the step
loop live in the core, so HTTP, JSON and SSE never share an interpreter with the step loop.
Guided-decoding specs are checked here (a bad schema is a 400 before anything is queued; xgrammar's
cache makes it once per spec) and compiled again where they run, in the core.
"""

from __future__ import annotations

from pathlib import Path

from trtc.formats.engine import Engine
from trtc.llm import check_prompt, open_stream, resolve_engine_dir
from trtc.runtime.engine_client import EngineClient
from trtc.runtime.lora import LoRARequest
from trtc.runtime.request_stream import RequestStream
from trtc.runtime.sampling_params import SamplingParams
from trtc.runtime.speculative import SpeculativeConfig
from trtc.runtime.tokenizer import has_tokenizer, load_tokenizer


class AsyncLLM:
    def __init__(self, model: str | Path, *, tp_size: int = 1, kv_cache_free_gpu_memory_fraction: float = 0.9,
                 kv_cache_max_tokens: int | None = None, device: str | None = None, num_fronts: int = 1, front: tuple[tuple[str, str], int, int] | None = None,
                 kv_events: bool = False, speculative_config: SpeculativeConfig | None = None, max_loras: int = 0,
                 max_lora_rank: int = 16) -> None:
        """Starts the engine core (for `num_fronts` fronts, this one front 0); or, with front=(addresses,
        index, core pid), is front `index` of `num_fronts` over a core another front started. kv_events:
        the core reports the KV blocks it registers and evicts (EngineClient.on_kv_events)."""
        self.engine_dir = resolve_engine_dir(model, tp_size)
        self.engine = Engine.load(self.engine_dir)
        self.max_seq_len = self.engine.build_config.max_seq_len
        self._tokenizer = None
        self._has_tokenizer = has_tokenizer(self.engine_dir)
        self._guided = None
        if front is None:
            self.async_engine = EngineClient(self.engine_dir, device, kv_cache_free_gpu_memory_fraction,
                                             kv_cache_max_tokens, num_fronts=num_fronts, kv_events=kv_events,
                                             speculative_config=speculative_config, max_loras=max_loras,
                                             max_lora_rank=max_lora_rank)
        else:
            self.async_engine = EngineClient.attach_front(*front, num_fronts)
        self.num_blocks = self.async_engine.num_blocks

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.engine_dir)
        return self._tokenizer

    @property
    def guided_decoder(self):
        """A grammar compiler here, to refuse a spec that does not compile before it is queued."""
        if self._guided is None:
            from trtc.runtime.guided_decoding import GuidedDecoder

            self._guided = GuidedDecoder(self.tokenizer, self.engine.graph.vocab_size, "cpu", 1)
        return self._guided

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        check_prompt(self.engine, prompt_ids, params)

    def start_async_engine(self) -> EngineClient:
        self.async_engine.attach()
        return self.async_engine

    def generate_async(self, prompt, sampling_params: SamplingParams | None = None,
                       after: RequestStream | None = None, lora_request: LoRARequest | None = None) -> RequestStream:
        """LLM.generate_async through the engine core process (with a LoRA adapter: lora_request)."""
        return open_stream(self, self.start_async_engine(), prompt, sampling_params or SamplingParams(), after,
                           lora_request)

    def close(self) -> None:
        self.async_engine.close()

