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
import itertools
import logging
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
from trtc.plugins.sampling.sampler import SamplingBatch, make_generator, sample
from trtc.runtime.longrope import crossing_recompute_steps
from trtc.runtime.outputs import TokenEvent
from trtc.runtime.parallel.step import Step
from trtc.runtime.ranks import start_ranks
from trtc.runtime.sampling_params import SamplingParams
from trtc.runtime.scheduler import Scheduler
from trtc.runtime.tokenizer import load_tokenizer
from trtc.runtime.worker import RankOptions, Worker

if TYPE_CHECKING:  # imported with the first guided request: xgrammar takes ~1.5 s to import
    from trtc.runtime.guided_decoding import GuidedDecoder, TokenBitmask

log = logging.getLogger("trtc")


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
    prompt_logits: torch.Tensor | None = None  # [prompt_len, vocab] f32 when asked for (teacher forcing)


def _top_logprobs(logits: torch.Tensor, reqs: list[RequestState]) -> dict[int, dict[int, float]]:
    """logits: [S, vocab] of `reqs` -> for each request asking for top logprobs, its top_logprobs most
    likely tokens {token id: logprob}, most likely first (log_softmax of the logits as they are)."""
    rows = [i for i, r in enumerate(reqs) if r.params.logprobs and r.params.top_logprobs]
    if not rows:
        return {}
    k = max(reqs[i].params.top_logprobs for i in rows)
    values, ids = logits[rows].float().log_softmax(dim=-1).topk(k, dim=-1)  # [R, k] each
    values, ids = values.tolist(), ids.tolist()
    tops = {}
    for j, i in enumerate(rows):
        n = reqs[i].params.top_logprobs
        tops[reqs[i].request_id] = dict(zip(ids[j][:n], values[j][:n]))
    return tops


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
    ) -> None:
        start = time.perf_counter()
        self.engine = engine if isinstance(engine, Engine) else Engine.load(engine)
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
            "loaded %s on %s in %.1f s: weights %.2f GiB; KV cache %d blocks x %d tokens = %d tokens (%.2f GiB)%s",
            self.engine.directory, self.device, self.load_seconds, self.runner.weight_bytes() / 2**30, self.num_blocks,
            bc.tokens_per_block, self.num_blocks * bc.tokens_per_block, self.runner.kv_cache_bytes() / 2**30,
            f" per rank, {self.engine.mapping.world_size} ranks" if self.ranks else "",
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

    # Requests -------------------------------------------------------------------------------------
    def add_request(
        self, prompt_ids: list[int], params: SamplingParams | None = None,
        on_event: Callable[[TokenEvent], None] | None = None,
    ) -> int:
        """Queue a request; raises TrtcError (and queues nothing) if it can never run."""
        params = params or SamplingParams()
        vocab = self.engine.graph.vocab_size
        if not prompt_ids or any(not 0 <= t < vocab for t in prompt_ids):
            raise TrtcError(f"prompt token ids must be non-empty and in [0, {vocab}); got {len(prompt_ids)} ids")
        if params.end_id is not None and params.end_id >= vocab:
            raise TrtcError(f"end_id {params.end_id} is not a token of the model (vocabulary of {vocab}); "
                            f"pass an id below {vocab}, or -1 for none")
        end_id = params.end_id if params.end_id is not None else (self.eos_ids[0] if self.eos_ids else -1)
        stop_words = [list(s) for s in params.stop_token_ids]
        if params.end_id is None:  # a model with several EOS ids stops on any of them
            stop_words += [[e] for e in self.eos_ids[1:]]
        if params.guided_decoding is not None:  # compile (or find in the cache) before anything is queued
            self.guided_decoder.compile(params.guided_decoding)
        rid = next(self._ids)
        try:
            self.scheduler.add_request(rid, list(prompt_ids), params.max_tokens, end_id, stop_words)
        except ValueError as e:
            raise TrtcError(str(e)) from None
        if params.guided_decoding is not None:
            stop_ids = ([end_id] if end_id >= 0 else []) + [w[0] for w in stop_words if len(w) == 1]
            self._guided.add(rid, params.guided_decoding, stop_ids)
        self.requests[rid] = RequestState(rid, list(prompt_ids), params, make_generator(params.seed, self.device), on_event)
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

    def close(self) -> None:
        """Give the device memory back now (CUDA graphs, KV cache, weights) and stop the other
        ranks; the executor is unusable after."""
        self.worker.close()
        if self.ranks is not None:
            self.ranks.close()

    def _guard(self, section: str = "step"):
        """Around work the ranks do together: a rank's failure becomes one TrtcError."""
        return self.ranks.guard(section) if self.ranks is not None else contextlib.nullcontext()

    def cancel(self, request_id: int) -> bool:
        return self.scheduler.cancel(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # The step -------------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        with self._guard():
            batch = self.scheduler.schedule()
            tokens, logprobs, tops = self._run(batch)
            updates = self.scheduler.update(tokens)
        return self._postprocess(updates, logprobs, tops)

    def _run(self, batch) -> tuple[list[int], dict[int, float], dict[int, dict[int, float]]]:
        """Plan the step, run it, and sample a token for every request whose chunk reached its end.
        Returns the tokens in batch order, each sampled request's logprob by request id, and the
        top logprobs of those that asked for them."""
        if len(batch.request_ids) == 0:
            return [], {}, {}
        rids = np.asarray(batch.request_ids)
        query_lens = np.asarray(batch.query_lens)
        ends = np.cumsum(query_lens) - 1  # each sequence's last fed token
        sample_rows = np.flatnonzero(np.asarray(batch.sample))
        keep = [i for i, rid in enumerate(rids) if self.requests[int(rid)].prompt_logits is not None]
        # logits rows: the sampled sequences' last tokens, then every token of those keeping prompt logits
        index = np.concatenate([ends[sample_rows]] + [np.arange(ends[i] - query_lens[i] + 1, ends[i] + 1) for i in keep])
        reqs = [self.requests[int(rid)] for rid in rids]
        step = Step.from_batch(batch, index, np.asarray([len(r.prompt_ids) + len(r.output_ids) for r in reqs]))
        if self.long_rope_context is not None:  # a sequence growing past LongRoPE's context: its keys recomputed
            bc = self.engine.build_config
            for recompute in crossing_recompute_steps(step, lambda i: reqs[i].prompt_ids + reqs[i].output_ids,
                                                      self.long_rope_context, bc.max_num_tokens, bc.tokens_per_block):
                self._execute(recompute)
        logits = self._execute(step)  # [len(index), vocab]
        bitmask = None  # grammars' masks, filled on the host while a GPU runs the step
        if self._guided is not None and self._guided.matchers:
            bitmask = self._guided.fill([int(rid) for rid in rids[sample_rows]])
        offset = len(sample_rows)
        for i in keep:  # rows written by position: a recompute after preemption writes the same rows again
            n = int(query_lens[i])
            positions = torch.from_numpy(np.asarray(batch.positions[ends[i] - n + 1 : ends[i] + 1], dtype=np.int64))
            self.requests[int(rids[i])].prompt_logits[positions.to(self.device)] = logits[offset : offset + n]
            offset += n
        if len(sample_rows) == 0:
            return [], {}, {}
        return self._sample(rids[sample_rows], logits[: len(sample_rows)], bitmask)

    def _execute(self, step: Step) -> torch.Tensor:
        if self.ranks is not None:
            self.ranks.send(step)  # the other ranks run it alongside
        return self.worker.execute(step)

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
            logprobs = logits.log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1)
        else:
            sampling = SamplingBatch.from_requests(
                [r.params for r in reqs], [r.prompt_ids for r in reqs], [r.output_ids for r in reqs],
                [r.generator for r in reqs], self.engine.graph.vocab_size, self.device,
            )
            tokens, logprobs = sample(logits, sampling)
        return tokens.tolist(), {r.request_id: lp for r, lp in zip(reqs, logprobs.tolist())}, tops

    def _postprocess(self, updates: list[tuple[int, int, str | None]], logprobs: dict[int, float],
                     tops: dict[int, dict[int, float]]) -> list[TokenEvent]:
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
                event = TokenEvent(rid, None, None, reason)
            r.finish_reason = reason
            events.append(event)
            if r.on_event is not None:
                r.on_event(event)
            if reason is not None:  # ended: the caller has had its last event
                self.scheduler.pop(rid)
                del self.requests[rid]
                if self._guided is not None:
                    self._guided.remove(rid)
        return events

    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Teacher-forced logits [len(prompt), vocab] f32 of each prompt (row i predicts token i+1),
        computed by the runtime like any request (in-flight batched, chunked prefill, paged KV cache).
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

    def _step_or_raise(self) -> None:
        if not self.step() and self.scheduler.num_running() == 0 and self.has_unfinished():
            raise TrtcError("no waiting request fits the KV-cache pool; give the runtime more KV-cache memory")

    def run_until_complete(self) -> None:
        while self.has_unfinished():
            self._step_or_raise()
