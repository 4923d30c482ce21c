"""The Python API: `LLM(engine_dir or hf_dir).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from trtc.compiler.engine_cache import cached_engine
from trtc.converters.hub import resolve_model_dir
from trtc.errors import TrtcError
from trtc.formats.build_config import BuildConfig
from trtc.formats.checkpoint import CHECKPOINT_FORMAT
from trtc.formats.engine import ENGINE_FORMAT, Engine
from trtc.runtime.async_engine import AsyncEngine
from trtc.runtime.detokenizer import Detokenizer
from trtc.runtime.executor import Executor, check_logit_bias
from trtc.runtime.lora import LoRARequest
from trtc.runtime.outputs import CompletionOutput, RequestOutput, TokenEvent, new_completion
from trtc.runtime.request_stream import RequestStream, snapshot
from trtc.runtime.sampling_params import SamplingParams
from trtc.runtime.speculative import SpeculativeConfig
from trtc.runtime.tokenizer import has_tokenizer, load_tokenizer

Prompt = str | Sequence[int]
__all__ = ["LLM", "load_tokenizer"]  # load_tokenizer: also for engine tools


def _config_format(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def is_engine_dir(path: Path) -> bool:
    return any(path.glob("rank*.engine")) or _config_format(path) == ENGINE_FORMAT


class LLM:
    """An engine with its tokenizer and executor.

    `model` is an engine directory, or an HF model directory (or a Hugging Face model id, at
    `revision`, fetched into the HF cache: trtc/converters/hub.py) that is built (with `tp_size`,
    `dtype`, `build_config`) into a cache directory keyed by its content and the flags, and reused.

    `speculative_config` (trtc/runtime/speculative.py): decoding requests take draft tokens, verified
    in their step (greedy output unchanged, sampled output equally distributed).

    `enable_lora`: requests may name a PEFT LoRA adapter (`generate(..., lora_request=LoRARequest(...))`),
    held in `max_loras` device slots of rank `max_lora_rank` at most (trtc/runtime/lora.py).

    A tensor-parallel engine starts its other ranks as processes (one GPU each); `close()`, the
    end of a `with LLM(...) as llm:` block, or the end of the program stops them. Under torchrun
    or mpirun, ranks other than 0 serve rank 0 inside `LLM(...)` and end there.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        tp_size: int = 1,
        dtype: str = "auto",
        build_config: BuildConfig | None = None,
        backend: str = "auto",
        kv_cache_max_tokens: int | None = None,
        kv_cache_free_gpu_memory_fraction: float = 0.9,
        enable_prefix_reuse: bool = True,
        enable_cuda_graphs: bool = True,
        device: str | torch.device | None = None,
        revision: str | None = None,
        speculative_config: SpeculativeConfig | None = None,
        enable_lora: bool = False,
        max_loras: int = 4,
        max_lora_rank: int = 16,
    ) -> None:
        self.engine_dir = resolve_engine_dir(model, tp_size, dtype, build_config, backend, revision)
        self.executor = Executor(
            self.engine_dir, device, kv_cache_max_tokens, kv_cache_free_gpu_memory_fraction, enable_prefix_reuse,
            enable_cuda_graphs, speculative_config, max_loras if enable_lora else 0, max_lora_rank,
        )
        self._tokenizer = None
        self._has_tokenizer = has_tokenizer(self.engine_dir)
        self._detokenizers: dict[int, Detokenizer | None] = {}  # request id -> its detokenizer, while it runs
        self._closed = False
        self.async_engine: AsyncEngine | None = None  # the engine thread, once generate_async is used

    def close(self) -> None:
        """Free the engine's memory and stop its other ranks; the LLM is unusable after."""
        if not self._closed:
            self._closed = True
            if self.async_engine is not None:
                self.async_engine.close()
            self.executor.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.engine_dir)
        return self._tokenizer

    # Generation -----------------------------------------------------------------------------------
    def generate(
        self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> RequestOutput | list[RequestOutput]:
        """Generate for one prompt (returns one RequestOutput) or a list (returns a list), all
        batched in flight together. A prompt is text or a list of token ids. A prompt the engine
        cannot take (longer than max_seq_len, say) comes back with `error` set and finish_reason
        "error"; the others run."""
        single = _is_single(prompts)
        outputs = self._submit_all([prompts] if single else list(prompts), sampling_params, lora_request)
        for _ in self._run(outputs):
            pass
        return outputs[0] if single else outputs

    def generate_stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                        lora_request: LoRARequest | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after each new token (`.outputs[0].text` grows), the last
        with `finished` set. Other queued requests keep running in the same steps. Each yielded
        output is a snapshot: later tokens do not change it."""
        self._check_open()
        out = self._submit(prompt, sampling_params, lora_request=lora_request)
        for changed in self._run([out]):
            if changed:
                yield snapshot(out)

    def generate_stream_batch(
        self, prompts: Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> Iterator[tuple[int, RequestOutput]]:
        """Stream many prompts in flight together: yield (index of the prompt, snapshot of its
        output) each time a request gains text or ends. A rejected prompt is yielded once, first,
        finished with `error` set."""
        outputs = self._submit_all(list(prompts), sampling_params, lora_request)
        for i, out in enumerate(outputs):
            if out.error is not None:
                yield i, out
        index = {out.request_id: i for i, out in enumerate(outputs) if out.error is None}
        for changed in self._run(outputs):
            for out in changed:
                yield index[out.request_id], snapshot(out)

    def generate_async(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                       after: RequestStream | None = None) -> RequestStream:
        """Submit one prompt to the engine thread (started on the first call, on the running asyncio
        loop) and return at once. `await` the result for the finished RequestOutput, or `async for`
        over it for snapshots as text arrives; requests from any number of tasks join the same
        in-flight batch. `.abort()` (or leaving the iteration early) cancels the request and frees
        its KV blocks. Raises TrtcError on a prompt the engine cannot take. Once this is used, the
        LLM's executor belongs to its engine thread: generate() and generate_stream() refuse.
        after: another request's stream on the same prompt (another sample of it): this one starts
        once that one's prompt is computed and shares its full KV blocks (prefix reuse) instead of
        computing them again."""
        if self._closed:
            self._check_open()
        return open_stream(self, self.start_async_engine(), prompt, sampling_params or SamplingParams(), after)

    def start_async_engine(self) -> AsyncEngine:
        """The engine thread for generate_async, started (on the running asyncio loop) on first use."""
        if self.async_engine is None:
            self.async_engine = AsyncEngine(self.executor)
        return self.async_engine

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise TrtcError (naming the limit) for a prompt the engine can never run."""
        check_prompt(self.executor.engine, prompt_ids, params)

    @property
    def engine(self) -> Engine:
        return self.executor.engine

    @property
    def max_seq_len(self) -> int:
        return self.executor.engine.build_config.max_seq_len

    @property
    def num_blocks(self) -> int:
        return self.executor.num_blocks

    @property
    def guided_decoder(self):
        """The executor's grammar compiler (a spec is compiled once, cached)."""
        return self.executor.guided_decoder

    # Internals ------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TrtcError("this LLM is closed (its engine memory was freed); create a new LLM(...) to generate again")
        if self.async_engine is not None:
            raise TrtcError("this LLM serves requests through generate_async; use generate_async for more")

    def _submit_all(self, prompts: list[Prompt], sampling_params, lora_request=None) -> list[RequestOutput]:
        self._check_open()
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise TrtcError(f"{len(params)} SamplingParams for {len(prompts)} prompts; pass one, or one per prompt")
        loras = lora_request if isinstance(lora_request, Sequence) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise TrtcError(f"{len(loras)} LoRA requests for {len(prompts)} prompts; pass one, or one per prompt")
        return [self._submit(p, sp, reject_ok=True, lora_request=lr) for p, sp, lr in zip(prompts, params, loras)]

    def _submit(self, prompt: Prompt, params: SamplingParams | None, reject_ok: bool = False,
                lora_request: LoRARequest | None = None) -> RequestOutput:
        params = params or SamplingParams()
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer(prompt).input_ids if text is not None else [int(t) for t in prompt]
        try:
            rid = self.executor.add_request(ids, params, lora_request=lora_request)
        except TrtcError as e:
            if not reject_ok:
                raise
            return RequestOutput(-1, text, ids, [CompletionOutput("", [], "error")], finished=True, error=str(e))
        self._detokenizers[rid] = Detokenizer(self.tokenizer, ids, params.stop) if self._has_tokenizer else None
        return RequestOutput(rid, text, ids, [new_completion(params)])

    def _run(self, outputs: list[RequestOutput]) -> Iterator[list[RequestOutput]]:
        """Step the executor until every one of `outputs` is finished; after each step, yield those
        of them that changed (other requests in flight advance in the same steps)."""
        by_id = {o.request_id: o for o in outputs if not o.finished}
        while by_id:
            changed = {}
            for event in self.executor.step():
                out = by_id.get(event.request_id)
                if out is not None and self._on_event(out, event):
                    changed[out.request_id] = out
            for rid in [rid for rid, o in by_id.items() if o.finished]:
                del by_id[rid]
            yield list(changed.values())
            if by_id and not self.executor.has_unfinished():
                raise RuntimeError(f"requests {sorted(by_id)} were lost by the executor")

    def _on_event(self, out: RequestOutput, event: TokenEvent) -> bool:
        """Add one event to its request's output; returns whether the output changed."""
        c = out.outputs[0]
        if out.finished:  # ended by a stop string; the scheduler's late "cancelled" changes nothing
            return False
        detok = self._detokenizers.get(out.request_id)
        if event.num_cached_tokens is not None:  # the request's first event
            out.prompt_logprobs, out.num_cached_tokens = event.prompt_logprobs, event.num_cached_tokens
        if event.token_id is not None:
            c.token_ids.append(event.token_id)
            if c.logprobs is not None:
                c.logprobs.append(event.logprob)
            if c.top_logprobs is not None:
                c.top_logprobs.append(event.top_logprobs or {})
            if detok is not None:
                detok.push([event.token_id])
        if detok is not None and event.finish_reason is not None:
            detok.flush()
        if detok is not None:
            c.text = detok.text
            if detok.stopped:  # a stop string ends the request; the text is cut before it
                if event.finish_reason is None:
                    self.executor.cancel(out.request_id)
                event = TokenEvent(event.request_id, None, None, "stop")
        if event.finish_reason is not None:
            self._detokenizers.pop(out.request_id, None)
            c.finish_reason, out.finished = event.finish_reason, True
            out.error = event.error
        return True


def open_stream(llm, engine, prompt, params: SamplingParams, after: RequestStream | None,
                lora_request: LoRARequest | None = None) -> RequestStream:
    """Tokenize and check `prompt` with `llm`'s tokenizer and limits (LLM or the server's AsyncLLM), submit it
    (with its LoRA adapter) to `engine` (the engine thread, or the engine core's client) and return its stream."""
    text = prompt if isinstance(prompt, str) else None
    ids = llm.tokenizer(prompt).input_ids if text is not None else [int(t) for t in prompt]
    llm.check_prompt(ids, params)
    detok = Detokenizer(llm.tokenizer, ids, params.stop) if llm._has_tokenizer else None
    return RequestStream(engine, engine.submit(ids, params, None if after is None else after.handle, lora_request),
                         text, detok)


def check_prompt(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> None:
    """Raise TrtcError (naming the limit) for a prompt `engine` can never run."""
    max_seq_len, vocab = engine.build_config.max_seq_len, engine.graph.vocab_size
    if not prompt_ids or any(not 0 <= t < vocab for t in prompt_ids):
        raise TrtcError(f"prompt token ids must be non-empty and in [0, {vocab})")
    check_logit_bias(params, vocab)
    if len(prompt_ids) + params.max_tokens > max_seq_len:
        raise TrtcError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                        f"engine's max_seq_len {max_seq_len}; shorten the prompt or lower max_tokens")


def resolve_engine_dir(model: str | Path, tp_size: int = 1, dtype: str = "auto", build_config: BuildConfig | None = None,
                       backend: str = "auto", revision: str | None = None) -> Path:
    """The engine directory of `model`: itself, or the cached build of an HF model (directory or Hub id)."""
    path = Path(model)
    if path.exists() and not path.is_dir():
        raise TrtcError(f"{path} is a file, not a directory; pass an engine directory, a local HF model directory "
                        "or a Hugging Face model id")
    path = resolve_model_dir(model, revision)  # a Hub model id: its snapshot in the HF cache
    if not is_engine_dir(path) and _config_format(path) == CHECKPOINT_FORMAT:
        Engine.load(path)  # refuses it, naming the build command
    return path if is_engine_dir(path) else cached_engine(path, tp_size, dtype, build_config, backend)


def _is_single(prompts) -> bool:
    return isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))

