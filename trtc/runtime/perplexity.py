"""Perplexity of an engine on text, computed through the runtime (scheduler, paged KV cache, the
model runner's forward), teacher-forced: each window is one prompt whose prefill yields the
log-probability of every next token.

Windows follow the fixture README's protocol: the text's first `max_tokens` tokens cut into
non-overlapping windows of `window_len` tokens, each BOS + window_len - 1 text tokens, every text
token scored (the first from BOS alone). perplexity = exp(total NLL / scored tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from trtc.errors import TrtcError
from trtc.quantization.calibration import token_windows
from trtc.runtime.attention_metadata import AttentionMetadata
from trtc.runtime.executor import Executor
from trtc.runtime.sampling_params import SamplingParams


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # summed over the scored tokens, in nats
    tokens: int


def prompt_logprobs(executor: Executor, prompts: list[list[int]]) -> list[torch.Tensor]:
    """For each prompt, the log-probability [len - 1] (float64) of token j + 1 given tokens 0..j.

    The prompts run as requests of one new token through the executor's scheduler (batched and
    chunked under the engine's token budget); the runner returns logits for every fed token.
    """
    sched, runner, device = executor.scheduler, executor.runner, executor.device
    rids = [executor.add_request(p, SamplingParams(max_tokens=1, end_id=-1)) for p in prompts]
    index = {rid: i for i, rid in enumerate(rids)}
    out = [torch.full((len(p) - 1,), math.nan, dtype=torch.float64) for p in prompts]
    while sched.has_unfinished():
        batch = sched.schedule()
        if len(batch.request_ids) == 0:
            raise TrtcError("an evaluation window does not fit the KV-cache pool; give the runtime more KV-cache memory")
        query_lens, context_lens = np.asarray(batch.query_lens), np.asarray(batch.context_lens)
        input_ids = torch.from_numpy(np.asarray(batch.input_ids, dtype=np.int64)).to(device)
        meta = AttentionMetadata.from_batch(batch, device)
        logits = runner.forward(input_ids, meta, torch.arange(len(input_ids), device=device))  # [T, vocab]
        logp = torch.log_softmax(logits.double(), dim=-1).cpu()
        start = 0
        for rid, n, ctx in zip(np.asarray(batch.request_ids).tolist(), query_lens.tolist(), context_lens.tolist()):
            prompt, first = prompts[index[rid]], ctx - n  # this chunk feeds positions first .. ctx - 1
            targets = torch.tensor(prompt[first + 1 : ctx + 1])  # a recomputed chunk overwrites the same slots
            out[index[rid]][first : first + len(targets)] = logp[start : start + len(targets)].gather(
                1, targets[:, None]).squeeze(1)
            start += n
        ends = np.cumsum(query_lens) - 1
        sampled = ends[np.flatnonzero(np.asarray(batch.sample))]
        for rid, _, reason in sched.update(logits[torch.from_numpy(sampled)].argmax(-1).cpu()):
            if reason is not None:
                sched.pop(rid)
                executor.requests.pop(rid, None)
    if any(torch.isnan(o).any() for o in out):
        raise TrtcError("internal error: some positions of an evaluation window were never computed")
    return out


def perplexity(
    executor: Executor, ids: list[int], window_len: int = 512, bos: int | None = None,
    max_tokens: int | None = None, windows_per_step: int = 8,
) -> Perplexity:
    """Perplexity of the engine on the token ids (the text's, without BOS)."""
    max_seq_len = executor.engine.build_config.max_seq_len
    if not 2 <= window_len < max_seq_len:
        raise TrtcError(f"--window_len {window_len} must be in [2, {max_seq_len - 1}] (below the engine's max_seq_len)")
    ids = ids[:max_tokens] if max_tokens is not None else ids
    windows = [w for w in token_windows(ids, window_len, bos) if len(w) >= 2]
    if not windows:
        raise TrtcError("the text has no token to score; pass a longer text")
    nll, count = 0.0, 0
    for i in range(0, len(windows), windows_per_step):
        for lp in prompt_logprobs(executor, windows[i : i + windows_per_step]):
            nll -= float(lp.sum())
            count += len(lp)
    return Perplexity(math.exp(nll / count), nll, count)
