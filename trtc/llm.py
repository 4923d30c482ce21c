"""The Python API: `LLM(engine_dir or hf_dir).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from trtc.compiler.engine_cache import cached_engine
from trtc.errors import TrtcError
from trtc.formats.build_config import BuildConfig
from trtc.runtime.executor import Executor
from trtc.runtime.outputs import CompletionOutput, RequestOutput, TokenEvent
from trtc.runtime.sampling_params import SamplingParams
from trtc.runtime.tokenizer import has_tokenizer, load_tokenizer

Prompt = str | Sequence[int]
__all__ = ["LLM", "load_tokenizer"]  # load_tokenizer: also for engine tools


def is_engine_dir(path: Path) -> bool:
    if any(path.glob("rank*.engine")):
        return True
    try:
        return json.loads((path / "config.json").read_text()).get("format") == "trtc-engine"
    except (OSError, ValueError, AttributeError):
        return False


class LLM:
    """An engine with its tokenizer and executor.

    `model` is an engine directory, or an HF model directory that is built (with `tp_size`,
    `dtype`, `build_config`) into a cache directory keyed by its content and the flags, and reused.

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
    ) -> None:
        path = Path(model)
        if not path.is_dir():
            raise TrtcError(f"{path} does not exist; pass an engine directory or a local HF model directory")
        self.engine_dir = path if is_engine_dir(path) else cached_engine(path, tp_size, dtype, build_config, backend)
        self.executor = Executor(
            self.engine_dir, device, kv_cache_max_tokens, kv_cache_free_gpu_memory_fraction, enable_prefix_reuse,
            enable_cuda_graphs,
        )
        self._tokenizer = None
        self._has_tokenizer = has_tokenizer(self.engine_dir)
        self._stop_strings: dict[int, list[str]] = {}  # request id -> stop strings, while it runs

    def close(self) -> None:
        """Free the engine's memory and stop its other ranks; the LLM is unusable after."""
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

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self._has_tokenizer else ""

    # Generation -----------------------------------------------------------------------------------
    def generate(
        self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> RequestOutput | list[RequestOutput]:
        """Generate for one prompt (returns one RequestOutput) or a list (returns a list), all
        batched in flight together. A prompt is text or a list of token ids. A prompt the engine
        cannot take (longer than max_seq_len, say) comes back with `error` set and finish_reason
        "error"; the others run."""
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(batch)
        if len(params) != len(batch):
            raise TrtcError(f"{len(params)} SamplingParams for {len(batch)} prompts; pass one, or one per prompt")
        outputs = [self._submit(p, sp, reject_ok=True) for p, sp in zip(batch, params)]
        by_id = {o.request_id: o for o in outputs if o.error is None}
        while self.executor.has_unfinished():
            for event in self.executor.step():
                if event.request_id in by_id:
                    self._on_event(by_id[event.request_id], event)
        return outputs[0] if single else outputs

    def generate_stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after each new token (`.outputs[0].text` grows), the last
        with `finished` set. Other queued requests keep running in the same steps."""
        out = self._submit(prompt, sampling_params)
        while not out.finished:
            events = [e for e in self.executor.step() if e.request_id == out.request_id]
            for event in events:
                self._on_event(out, event)
            if events:
                yield copy.deepcopy(out)

    # Internals ------------------------------------------------------------------------------------
    def _submit(self, prompt: Prompt, params: SamplingParams | None, reject_ok: bool = False) -> RequestOutput:
        params = params or SamplingParams()
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer(prompt).input_ids if text is not None else [int(t) for t in prompt]
        try:
            rid = self.executor.add_request(ids, params)
        except TrtcError as e:
            if not reject_ok:
                raise
            return RequestOutput(-1, text, ids, [CompletionOutput("", [], "error")], finished=True, error=str(e))
        self._stop_strings[rid] = params.stop
        return RequestOutput(rid, text, ids, [CompletionOutput("", [], None, [] if params.logprobs else None)])

    def _on_event(self, out: RequestOutput, event: TokenEvent) -> None:
        c, stop = out.outputs[0], self._stop_strings.get(out.request_id)
        if out.finished:  # ended by a stop string; the scheduler's late "cancelled" changes nothing
            return
        if event.token_id is not None:
            c.token_ids.append(event.token_id)
            if c.logprobs is not None:
                c.logprobs.append(event.logprob)
        c.text = self._decode(c.token_ids)
        if stop and event.finish_reason is None:
            hit = [i for i in (c.text.find(s) for s in stop) if i >= 0]
            if hit:  # a stop string ends the request; the text is cut before it
                c.text = c.text[: min(hit)]
                self.executor.cancel(out.request_id)
                c.finish_reason, out.finished = "stop", True
                return
        if event.finish_reason is not None:
            self._stop_strings.pop(out.request_id, None)
            if not out.finished:
                c.finish_reason, out.finished = event.finish_reason, True

