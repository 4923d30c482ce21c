"""The executor loop: schedule -> run -> postprocess, one step at a time.

The C++ scheduler decides each step's batch (in-flight batching, chunked prefill, preemption,
prefix reuse); the model runner computes the logits; sampling happens on the device; the
scheduler's update finishes requests. Streaming callbacks fire from postprocess.

A tensor-parallel engine runs one process per rank (trtc/runtime/ranks.py): this executor is
rank 0; it owns the scheduler, sends each step's model inputs to the other ranks before running
them itself, and alone samples.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from trtc.compiler.tune import tune_at_first_load
from trtc.errors import TrtcError
from trtc.formats.engine import Engine
from trtc.plugins.sampling.sampler import SamplingBatch, make_generator, sample, token_logprobs, top_logprobs
from trtc.runtime.longrope import crossing_recompute_steps
from trtc.runtime.lora import LoRARequest, LoRASlots
from trtc.runtime.outputs import PromptLogprobs, TokenEvent
from trtc.runtime.parallel.step import Step
from trtc.runtime.prompt_logprobs import PromptScoring, plan_scoring, position_logprobs, score_rows
from trtc.runtime.ranks import start_ranks
from trtc.runtime.sampling_params import SamplingParams
from trtc.runtime.scheduler import Scheduler
from trtc.runtime.speculative import SpecStats, SpeculativeConfig, ngram_draft, verify
from trtc.runtime.tokenizer import load_tokenizer
from trtc.runtime.worker import RankOptions, Worker

if TYPE_CHECKING:  # imported with the first guided request: xgrammar takes ~1.5 s to import
    from trtc.runtime.guided_decoding import GuidedDecoder, TokenBitmask

log = logging.getLogger("trtc")
FAULT_INJECT_ENV = "TRTC_FAULT_INJECT_STEP"  # K or K:device: step K raises (a failed step, or a broken device)
BROKEN_DEVICE = ("device-side assert", "illegal memory access", "unspecified launch failure", "CUDA error",
                 "cudaError", "CUBLAS_STATUS_EXECUTION_FAILED", "uncorrectable ECC", "misaligned address")


class EngineDeadError(TrtcError):
    """The device (or a tensor-parallel rank) is broken: no step can run any more; restart the process."""


def device_broken(error: BaseException) -> bool:
    """Whether a step's error leaves the device unusable (a CUDA error: every later kernel fails too), as
    opposed to one that fails only the step's requests (out of memory, a bad tensor shape)."""
    if isinstance(error, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return any(m in str(error) for m in BROKEN_DEVICE)


def check_logit_bias(params: SamplingParams, vocab: int) -> None:
    """Raise TrtcError for a logit_bias key that is not a token of a `vocab`-token model."""
    bad = [t for t in params.logit_bias or {} if t >= vocab]
    if bad:
        raise TrtcError(f"logit_bias key {bad[0]} is not a token of the model (vocabulary of {vocab}); "
                        f"pass token ids below {vocab}")


def _fault_injection() -> tuple[int, bool] | None:
    """TRTC_FAULT_INJECT_STEP=K: the K-th step that runs a batch (from 1) raises RuntimeError, as an
    out-of-memory step would; K:device raises a CUDA-like error, as a broken device would (tests)."""
    value = os.environ.get(FAULT_INJECT_ENV, "").strip()
    if not value:
        return None
    step, _, kind = value.partition(":")
    if not step.isdigit() or kind not in ("", "device"):
        raise TrtcError(f"{FAULT_INJECT_ENV}={value!r}: expected a step number K, or K:device")
    return int(step), kind == "device"


@dataclass
class RequestState:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    on_event: Callable[[TokenEvent], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # filled as its prefill chunks run, when asked for
    num_cached_tokens: int | None = None  # prompt tokens taken from the prefix cache, set when first scheduled
    first_event_sent: bool = False
    prompt_logits: torch.Tensor | None = None  # [prompt_len, vocab] f32: Executor.prompt_logits only (tests)
    lora_slot: int = -1  # its LoRA adapter's slot while it runs (-1: none)


def _top_logprobs(logits: torch.Tensor, reqs: list[RequestState]) -> dict[int, dict[int, float]]:
    """logits: [S, vocab] of `reqs` -> for each request asking for top logprobs, its top_logprobs most
    likely tokens {token id: logprob}, most likely first (log_softmax of the logits as they are)."""
    rows = [i for i, r in enumerate(reqs) if r.params.logprobs and r.params.top_logprobs]
    if not rows:
        return {}
    k = max(reqs[i].params.top_logprobs for i in rows)
    values, ids = top_logprobs(logits, rows, k)  # [R, k] each, in bounded chunks of rows
    values, ids = values.tolist(), ids.tolist()
    tops = {}
    for j, i in enumerate(rows):
        n = reqs[i].params.top_logprobs
        tops[reqs[i].request_id] = dict(zip(ids[j][:n], values[j][:n]))
    return tops


class _LogitsRows:
    """Takes the step's logits rows chunk by chunk as the runner computes them (rows in `index`
    order: sampled, then scored, then kept): keeps the sampled rows, reduces the scored ones on the
    device at once (their chunk is then dropped) and keeps rows of Executor.prompt_logits."""

    def __init__(self, num_sampled: int, scoring: PromptScoring | None, device: torch.device) -> None:
        self.num_sampled, self.scoring = num_sampled, scoring
        self.num_scored = 0 if scoring is None else len(scoring.targets)
        self.targets = None if scoring is None else torch.from_numpy(scoring.targets.astype(np.int64)).to(device)
        self._sampled, self._scored, self._kept = [], [], []

    def __call__(self, start: int, logits: torch.Tensor) -> None:  # logits: [c, vocab] rows start..start+c
        a, b = start, start + logits.shape[0]
        s, p = self.num_sampled, self.num_sampled + self.num_scored
        if a < s:
            self._sampled.append(logits[: min(b, s) - a])
        lo, hi = max(a, s), min(b, p)
        if lo < hi:
            self._scored.append(score_rows(logits[lo - a : hi - a], self.targets[lo - s : hi - s],
                                           self.scoring.top_n))
        if b > p:
            self._kept.append((max(a, p), logits[max(a, p) - a :]))

    def sampled(self) -> torch.Tensor:
        """[num_sampled, vocab]"""
        return self._sampled[0] if len(self._sampled) == 1 else torch.cat(self._sampled) if self._sampled else None

    def scored(self) -> tuple[list, list, list, list]:
        """Per scored row: logprob, rank, top ids, top logprobs (host lists)."""
        parts = [torch.cat([getattr(c, f) for c in self._scored]) for f in ("logprobs", "ranks", "top_ids", "top_values")]
        logprobs, ranks, ids, values = (t.tolist() for t in parts)
        return logprobs, ranks, values, ids

    def kept(self, offset: int, n: int) -> torch.Tensor:
        """Rows offset..offset+n (an Executor.prompt_logits request's chunk)."""
        kept = self._kept[0][1] if len(self._kept) == 1 else torch.cat([t for _, t in self._kept])
        return kept[offset - self.num_sampled - self.num_scored :][:n]


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Executor:
    """device: "cuda" or "cpu" (default: cuda if there is a GPU). A tensor-parallel engine runs its
    rank r on cuda:r (cuda:LOCAL_RANK under torchrun / mpirun). Call close() to stop its ranks
    before the process ends."""

    def __init__(
        self,
        engine: Engine | str | Path,
        device: torch.device | str | None = None,
        kv_cache_max_tokens: int | None = None,
        free_gpu_memory_fraction: float = 0.9,
        enable_prefix_reuse: bool = True,
        enable_cuda_graphs: bool = True,
        speculative_config: SpeculativeConfig | None = None,
        max_loras: int = 0,
        max_lora_rank: int = 16,
    ) -> None:
        """speculative_config: draft tokens proposed for decoding requests and verified in their step
        (trtc/runtime/speculative.py); None: one token per request per step. max_loras: LoRA adapter
        slots (trtc/runtime/lora.py), each of rank max_lora_rank at most; 0: no adapters."""
        start = time.perf_counter()
        self.engine = engine if isinstance(engine, Engine) else Engine.load(engine)
        if max_loras and (self.engine.pretrained.quantization or self.engine.graph.long_rope_context is not None
                          or self.engine.mapping.tp_size != 1):
            raise TrtcError("LoRA adapters need a tp 1, unquantized engine without LongRoPE for now; serve this "
                            "engine without LoRA")
        options = RankOptions(kv_cache_max_tokens, free_gpu_memory_fraction, enable_cuda_graphs)
        device = torch.device(device) if device is not None else default_device()
        self.engine.check_runtime(device)
        self.engine = tune_at_first_load(self.engine, device)  # built without its GPU: tune once, store in the engine
        self.ranks, self.device = start_ranks(self.engine, device, options)  # rank 0 from here on
        with self._guard("start-up"):
            self.worker = Worker(self.engine, self.device, self.ranks.group if self.ranks else None, options)
        bc = self.engine.build_config
        self.long_rope_context = self.engine.graph.long_rope_context  # None: no LongRoPE (trtc/runtime/longrope.py)
        if self.long_rope_context is not None:
            enable_prefix_reuse = False  # a LongRoPE sequence's cached keys depend on its length, not its prefix alone
        self.load_seconds = time.perf_counter() - start
        log.info(
            "loaded %s on %s in %.1f s: weights %.2f GiB; KV cache %d blocks x %d tokens = %d tokens (%.2f GiB)%s; %s",
            self.engine.directory, self.device, self.load_seconds, self.runner.weight_bytes() / 2**30, self.num_blocks,
            bc.tokens_per_block, self.num_blocks * bc.tokens_per_block, self.runner.kv_cache_bytes() / 2**30,
            f" per rank, {self.engine.mapping.world_size} ranks" if self.ranks else "", self.worker.memory_line(),
        )
        self.scheduler = Scheduler(
            self.num_blocks, bc.tokens_per_block, bc.max_batch_size, bc.max_num_tokens, bc.max_seq_len,
            enable_prefix_reuse,
        )
        self.requests: dict[int, RequestState] = {}
        self._ids = itertools.count()
        graph = self.engine.graph
        self.eos_ids = list(graph.eos_token_id)
        self._guided: GuidedDecoder | None = None  # built with the first guided request (it needs the tokenizer)
        self._fault = _fault_injection()
        self._num_steps = 0  # steps that ran a batch
        self.speculative = speculative_config
        self.spec_stats = SpecStats()
        self.draft = None  # the draft_target proposer's draft engine
        if speculative_config is not None and speculative_config.mode == "draft_target":
            from trtc.runtime.draft_model import DraftModel

            try:
                draft = Executor(speculative_config.draft_engine_dir, self.device,
                                 kv_cache_max_tokens=self.num_blocks * bc.tokens_per_block)
                self.draft = DraftModel(draft, self.engine)
            except BaseException:
                self.close()  # the target's device memory and ranks, before the error reaches the caller
                raise
        self.lora: LoRASlots | None = None
        if max_loras:
            self.lora = LoRASlots(graph, self.engine.mapping, max_loras, max_lora_rank, self.runner.dtype, self.device)
            self.runner.lora = self.lora

    # Requests -------------------------------------------------------------------------------------
    def add_request(
        self, prompt_ids: list[int], params: SamplingParams | None = None,
        on_event: Callable[[TokenEvent], None] | None = None, lora_request: LoRARequest | None = None,
    ) -> int:
        """Queue a request (with a LoRA adapter: lora_request); raises TrtcError (and queues nothing) if it
        can never run."""
        params = params or SamplingParams()
        vocab = self.engine.graph.vocab_size
        if not prompt_ids or any(not 0 <= t < vocab for t in prompt_ids):
            raise TrtcError(f"prompt token ids must be non-empty and in [0, {vocab}); got {len(prompt_ids)} ids")
        check_logit_bias(params, vocab)
        if params.end_id is not None and params.end_id >= vocab:
            raise TrtcError(f"end_id {params.end_id} is not a token of the model (vocabulary of {vocab}); "
                            f"pass an id below {vocab}, or -1 for none")
        end_id = params.end_id if params.end_id is not None else (self.eos_ids[0] if self.eos_ids else -1)
        stop_words = [list(s) for s in params.stop_token_ids]
        if params.end_id is None:  # a model with several EOS ids stops on any of them
            stop_words += [[e] for e in self.eos_ids[1:]]
        if params.guided_decoding is not None:  # compile (or find in the cache) before anything is queued
            self.guided_decoder.compile(params.guided_decoding)
        slot = -1
        if lora_request is not None:
            if self.lora is None:
                raise TrtcError(f"LoRA adapter {lora_request.lora_name!r} asked for, but this engine was loaded without "
                                "adapter slots; load it with max_loras (trtc serve --max_loras N)")
            slot = self.lora.acquire(lora_request)
        rid = next(self._ids)
        try:
            self.scheduler.add_request(rid, list(prompt_ids), params.max_tokens, end_id, stop_words,
                                       reuse_prefix=params.prompt_logprobs is None,
                                       salt=lora_request.salt if lora_request is not None else 0)
        except ValueError as e:
            if slot >= 0:
                self.lora.release(slot)
            raise TrtcError(str(e)) from None
        if params.guided_decoding is not None:
            stop_ids = ([end_id] if end_id >= 0 else []) + [w[0] for w in stop_words if len(w) == 1]
            self._guided.add(rid, params.guided_decoding, stop_ids)
        state = RequestState(rid, list(prompt_ids), params, make_generator(params.seed, self.device), on_event,
                             lora_slot=slot)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]  # the first token has no logprob
        self.requests[rid] = state
        return rid

    @property
    def guided_decoder(self) -> GuidedDecoder:
        """The engine's grammar compiler (xgrammar, with its cache) and guided requests' matchers."""
        if self._guided is None:
            from trtc.runtime.guided_decoding import GuidedDecoder

            graph = self.engine.graph
            self._guided = GuidedDecoder(
                load_tokenizer(self.engine.directory), graph.vocab_size, self.device, self.engine.build_config.max_batch_size
            )
        return self._guided

    @property
    def runner(self):
        """Rank 0's model runner (the worker's)."""
        return self.worker.runner

    @property
    def num_blocks(self) -> int:
        return self.worker.num_blocks

    def step_counts(self) -> tuple[int, int]:
        """Steps that ran a batch so far, and how many of them replayed a decode CUDA graph."""
        return self._num_steps, self.worker.graph_steps

    def close(self) -> None:
        """Give the device memory back now (CUDA graphs, KV cache, weights, workspaces, the grammar
        masks) and stop the other ranks; the executor is unusable after."""
        self.worker.close()
        if self.draft is not None:
            self.draft.close()
        if self.ranks is not None:
            self.ranks.close()
        self.requests.clear()
        self._guided = None
        gc.collect()  # tensors held by reference cycles (autograd-free, but graphs and closures)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):  # cuBLAS's workspace of each stream it ran on
                torch._C._cuda_clearCublasWorkspaces()
            torch.cuda.empty_cache()

    def _guard(self, section: str = "step"):
        """Around work the ranks do together: a rank's failure becomes one TrtcError."""
        return self.ranks.guard(section) if self.ranks is not None else contextlib.nullcontext()

    def cancel(self, request_id: int) -> bool:
        return self.scheduler.cancel(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # The step -------------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """One step's events. A step that fails (out of memory, say) ends its own requests with finish
        reason "error" (the event's `error` says why) and frees their blocks; the executor goes on.
        A broken device or tensor-parallel rank raises EngineDeadError: nothing can run any more."""
        with self._guard():
            if self.speculative is not None:
                self._propose()
            batch = self.scheduler.schedule()
            try:
                if len(batch.request_ids):
                    self._num_steps += 1
                    self._inject_fault()
                tokens, logprobs, tops, counts = self._run(batch)
            except Exception as e:  # noqa: BLE001 - the step's requests hear why; the engine decides if it lives
                if self.ranks is not None:  # the ranks' collectives are out of step: the guard names the rank
                    raise
                if device_broken(e):  # the device is lost
                    raise EngineDeadError(f"the engine's device failed in a step ({type(e).__name__}: "
                                          f"{str(e).splitlines()[0] if str(e) else ''}); restart the process") from e
                return self._fail_step(batch, e)
            updates = self.scheduler.update(tokens, counts)
        return self._postprocess(updates, logprobs, tops)

    def _propose(self) -> None:
        """Drafts for the decoding requests that speculate: those without logprobs or a grammar (their
        per-token outputs are one token's)."""
        cfg = self.speculative
        targets = {rid: r.prompt_ids + r.output_ids for rid, r in self.requests.items()
                   if r.output_ids and not r.params.logprobs and r.params.guided_decoding is None}
        if self.draft is not None:
            drafts = self.draft.propose(targets, cfg.max_draft_len) if targets else {}
        else:
            drafts = {rid: ngram_draft(np.asarray(t), cfg.max_draft_len, cfg.prompt_lookup_min, cfg.prompt_lookup_max)
                      for rid, t in targets.items()}
        for rid, draft in drafts.items():
            if draft:
                self.scheduler.set_draft(rid, draft)

    def _inject_fault(self) -> None:
        if self._fault is not None and self._num_steps == self._fault[0]:
            if self._fault[1]:
                raise RuntimeError(f"CUDA error: an illegal memory access was encountered ({FAULT_INJECT_ENV})")
            raise RuntimeError(f"injected failure of step {self._num_steps} ({FAULT_INJECT_ENV})")

    def _fail_step(self, batch, error: Exception) -> list[TokenEvent]:
        """End every request of the failed step with finish reason "error" (their blocks are freed);
        requests cancelled before it end as usual."""
        failed = {int(rid) for rid in batch.request_ids}
        line = f"{type(error).__name__}: {str(error).splitlines()[0]}" if str(error) else type(error).__name__
        log.error("a step of %d requests failed (%s); they end with an error, the engine goes on", len(failed), line)
        for rid in failed:
            self.scheduler.cancel(rid)
        updates = self.scheduler.update([0] * int(np.count_nonzero(np.asarray(batch.sample))))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # what the failed step held, back to the device before the next one
        return self._postprocess([(rid, tok, "error" if rid in failed else r) for rid, tok, r in updates], {}, {},
                                 f"the step running this request failed ({line}); retry it")

    def _run(self, batch) -> tuple[list[int], dict[int, float], dict[int, dict[int, float]], list[int]]:
        """Plan the step, run it, and sample a token for every request whose chunk reached its end (a
        speculating request: its kept draft tokens and one more). Returns the tokens in batch order,
        how many each sampled request got (empty: one each), each sampled request's logprob by request
        id, and the top logprobs of those that asked for them. Prompt rows of requests asking for prompt
        logprobs are scored as the runner computes their logits (trtc/runtime/prompt_logprobs.py)."""
        if len(batch.request_ids) == 0:
            return [], {}, {}, []
        rids = np.asarray(batch.request_ids)
        query_lens = np.asarray(batch.query_lens)
        ends = np.cumsum(query_lens) - 1  # each sequence's last fed token
        sample_rows = np.flatnonzero(np.asarray(batch.sample))
        draft_lens = np.asarray(batch.draft_lens)
        spec_rows = sample_rows[draft_lens[sample_rows] > 0]  # their last known token and draft: 1 + d logits rows
        sample_rows = sample_rows[draft_lens[sample_rows] == 0]
        reqs = [self.requests[int(rid)] for rid in rids]
        for i, r in enumerate(reqs):
            if r.num_cached_tokens is None:  # admitted in this step: its chunk starts after the cached prefix
                r.num_cached_tokens = int(batch.positions[ends[i] - query_lens[i] + 1])
        scoring = plan_scoring(batch, ends, query_lens, reqs)
        keep = [i for i, r in enumerate(reqs) if r.prompt_logits is not None]
        # logits rows: the sampled sequences' last tokens, the speculating ones' verified tokens, the prompt rows
        # scored, every token of those keeping logits
        index = np.concatenate([ends[sample_rows]] + [np.arange(ends[i] - draft_lens[i], ends[i] + 1) for i in spec_rows]
                               + ([scoring.token_rows] if scoring else [])
                               + [np.arange(ends[i] - query_lens[i] + 1, ends[i] + 1) for i in keep])
        lora = [r.lora_slot for r in reqs] if self.lora is not None else []
        step = Step.from_batch(batch, index, np.asarray([len(r.prompt_ids) + len(r.output_ids) for r in reqs]),
                               np.asarray(lora, np.int32) if any(s >= 0 for s in lora) else None)
        if self.long_rope_context is not None:  # a sequence growing past LongRoPE's context: its keys recomputed
            bc = self.engine.build_config
            for recompute in crossing_recompute_steps(step, lambda i: reqs[i].prompt_ids + reqs[i].output_ids,
                                                      self.long_rope_context, bc.max_num_tokens, bc.tokens_per_block):
                self._execute(recompute)
        num_verified = int((draft_lens[spec_rows] + 1).sum())
        rows = _LogitsRows(len(sample_rows) + num_verified, scoring, self.device)
        if scoring is None:  # every row wanted as is: [len(index), vocab] in one piece
            rows(0, self._execute(step))
        else:  # scored rows reduced chunk by chunk as the runner computes them
            self._execute(step, rows)
        logits = rows.sampled()  # [len(sample_rows) + num_verified, vocab]
        bitmask = None  # grammars' masks, filled on the host while a GPU runs the step
        if self._guided is not None and self._guided.matchers:
            bitmask = self._guided.fill([int(rid) for rid in rids[sample_rows]])
        if scoring is not None:
            self._add_prompt_logprobs(reqs, scoring, rows.scored())
        offset = len(sample_rows) + num_verified + (len(scoring.targets) if scoring else 0)
        for i in keep:  # rows written by position: a recompute after preemption writes the same rows again
            n = int(query_lens[i])
            positions = torch.from_numpy(np.asarray(batch.positions[ends[i] - n + 1 : ends[i] + 1], dtype=np.int64))
            self.requests[int(rids[i])].prompt_logits[positions.to(self.device)] = rows.kept(offset, n)
            offset += n
        if len(spec_rows) == 0:
            if len(sample_rows) == 0:
                return [], {}, {}, []
            return (*self._sample(rids[sample_rows], logits, bitmask), [])
        tokens, logprobs, tops = self._sample(rids[sample_rows], logits[: len(sample_rows)], bitmask) \
            if len(sample_rows) else ([], {}, {})
        emitted = self._verify(rids[spec_rows], batch, spec_rows, logits[len(sample_rows) :])
        plain, spec = iter(tokens), iter(emitted)
        out, counts = [], []
        for i in np.flatnonzero(np.asarray(batch.sample)):  # batch order, as update() takes them
            got = next(spec) if draft_lens[i] > 0 else [next(plain)]
            out += got
            counts.append(len(got))
        logprobs.update({int(rid): float("nan") for rid in rids[spec_rows]})
        return out, logprobs, tops, counts

    def _verify(self, request_ids: np.ndarray, batch, rows: np.ndarray, logits: torch.Tensor) -> list[list[int]]:
        """The emitted tokens of each speculating request from its 1 + d logits rows (trtc/runtime/speculative.py)."""
        positions = np.cumsum(np.asarray(batch.query_lens)) - 1
        drafts = [np.asarray(batch.input_ids[positions[i] - batch.draft_lens[i] + 1 : positions[i] + 1]).tolist()
                  for i in rows]
        reqs = [self.requests[int(rid)] for rid in request_ids]
        params, prompts, outputs, generators = [], [], [], []
        for r, draft in zip(reqs, drafts):
            for j in range(len(draft) + 1):  # row j: the penalties see the draft tokens before it
                params.append(r.params)
                prompts.append(r.prompt_ids)
                outputs.append(r.output_ids + draft[:j])
                generators.append(r.generator)
        sampling = SamplingBatch.from_requests(params, prompts, outputs, generators, self.engine.graph.vocab_size,
                                               self.device)
        emitted = verify(logits, drafts, sampling)
        stats = self.spec_stats
        stats.num_drafts += len(drafts)
        stats.num_draft_tokens += sum(len(d) for d in drafts)
        stats.num_accepted_tokens += sum(len(e) - 1 for e in emitted)
        return emitted

    def _add_prompt_logprobs(self, reqs: list[RequestState], scoring: PromptScoring, scored: list) -> None:
        """Append this step's scored rows to each scoring request's prompt_logprobs (one transfer)."""
        logprobs, ranks, values, ids = scored
        offset = 0
        for i, _start, count in scoring.requests:
            r, n = reqs[i], reqs[i].params.prompt_logprobs
            for j in range(offset, offset + count):
                r.prompt_logprobs.append(position_logprobs(int(scoring.targets[j]), logprobs[j], ranks[j],
                                                           ids[j], values[j], n))
            offset += count

    def _execute(self, step: Step, on_logits: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor | None:
        if self.ranks is not None:
            self.ranks.send(step)  # the other ranks run it alongside
        return self.worker.execute(step, on_logits)

    def _sample(
        self, request_ids: np.ndarray, logits: torch.Tensor, bitmask: TokenBitmask | None = None
    ) -> tuple[list[int], dict[int, float], dict[int, dict[int, float]]]:
        """One token per request from its logits [S, vocab], on the device; rows with a grammar are
        masked first (in place, after the forward and outside its CUDA graph); a row's logit bias is added
        by the sampler on a copy, so logprobs and top logprobs stay the model's (the mask applied)."""
        if bitmask is not None:
            bitmask.apply(logits)
        reqs = [self.requests[int(rid)] for rid in request_ids]
        tops = _top_logprobs(logits, reqs)
        if all(r.params.is_greedy and not _has_penalty(r.params) and r.params.logit_bias is None
               for r in reqs):  # the common case: argmax only
            tokens = logits.argmax(dim=-1)
            if not any(r.params.logprobs for r in reqs):
                return tokens.tolist(), {r.request_id: float("nan") for r in reqs}, tops
            logprobs = token_logprobs(logits, tokens)
        else:
            sampling = SamplingBatch.from_requests(
                [r.params for r in reqs], [r.prompt_ids for r in reqs], [r.output_ids for r in reqs],
                [r.generator for r in reqs], self.engine.graph.vocab_size, self.device,
            )
            tokens, logprobs = sample(logits, sampling)
        return tokens.tolist(), {r.request_id: lp for r, lp in zip(reqs, logprobs.tolist())}, tops

    def _postprocess(self, updates: list[tuple[int, int, str | None]], logprobs: dict[int, float],
                     tops: dict[int, dict[int, float]], error: str | None = None) -> list[TokenEvent]:
        """error: why the requests ending with finish reason "error" failed."""
        events = []
        for rid, token, reason in updates:
            r = self.requests.get(rid)
            if r is None:
                continue
            if token >= 0 and self._guided is not None:
                guided_reason = self._guided.advance(rid, token, reason)
                if guided_reason != reason and reason is None:
                    self.scheduler.cancel(rid)  # the grammar ended it: the blocks are freed now
                reason = guided_reason
            if token >= 0:
                r.output_ids.append(token)
                r.logprobs.append(logprobs[rid])
                event = TokenEvent(rid, token, logprobs[rid], reason, tops.get(rid))
            else:
                event = TokenEvent(rid, None, None, reason, error=error if reason == "error" else None)
            if not r.first_event_sent:
                r.first_event_sent = True
                event.prompt_logprobs, event.num_cached_tokens = r.prompt_logprobs, r.num_cached_tokens
            r.finish_reason = reason
            events.append(event)
            if r.on_event is not None:
                r.on_event(event)
            if reason is not None:  # ended: the caller has had its last event
                self.scheduler.pop(rid)
                del self.requests[rid]
                if r.lora_slot >= 0:
                    self.lora.release(r.lora_slot)
                if self.draft is not None:
                    self.draft.release(rid)
                if self._guided is not None:
                    self._guided.remove(rid)
        return events

    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Teacher-forced logits [len(prompt), vocab] f32 of each prompt (row i predicts token i+1),
        computed by the runtime like any request (in-flight batched, chunked prefill, paged KV cache).
        For tests that compare whole logits with a reference; it holds [len(prompt), vocab] per
        prompt, so scoring (eval, the server) goes through `score` / SamplingParams.prompt_logprobs.
        A prompt whose prefix came from cached blocks (prefix reuse) has positions that were never
        computed: that raises, naming the fix."""
        states = []
        for prompt in prompts:
            rid = self.add_request(prompt, SamplingParams(max_tokens=1, end_id=-1))
            self.requests[rid].prompt_logits = torch.full((len(prompt), self.engine.graph.vocab_size), float("nan"),
                                                          device=self.device)
            states.append(self.requests[rid])
        while any(s.request_id in self.requests for s in states):
            self._step_or_raise()
        if any(s.prompt_logits[:, 0].isnan().any() for s in states):  # a row is written whole or not at all
            raise TrtcError("prompt logits need every prompt position computed, but a prompt's prefix came from the "
                            "prefix cache; create the executor with enable_prefix_reuse=False")
        return [s.prompt_logits for s in states]

    def score(self, prompts: list[list[int]], top_n: int = 0) -> list[PromptLogprobs]:
        """The prompt logprobs (SamplingParams.prompt_logprobs=top_n) of each prompt, computed by the
        runtime like any request (in-flight batched, chunked prefill, paged KV cache): the scoring
        path of `trtc eval`, the API and the server."""
        params = SamplingParams(max_tokens=1, end_id=-1, prompt_logprobs=top_n)
        states = [self.requests[self.add_request(p, params)] for p in prompts]
        while any(s.request_id in self.requests for s in states):
            self._step_or_raise()
        return [s.prompt_logprobs for s in states]

    def _step_or_raise(self) -> None:
        if not self.step() and self.scheduler.num_running() == 0 and self.has_unfinished():
            raise TrtcError("no waiting request fits the KV-cache pool; give the runtime more KV-cache memory")

    def run_until_complete(self) -> None:
        while self.has_unfinished():
            self._step_or_raise()
