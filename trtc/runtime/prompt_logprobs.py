"""Prompt logprobs (vLLM's `prompt_logprobs`): each prompt token's log-probability given the tokens
before it, its rank and the top N at its position, reduced on the device as the logits rows are
computed.

A prefill chunk's row at position p predicts prompt token p + 1. The executor asks the model
runner for the logits of those rows too; the runner computes them in chunks of at most
max_batch_size rows (the rows the memory plan counts) and hands each chunk over as it is computed;
`score_rows` reduces it to [rows] logprobs, [rows] ranks and [rows, N] top entries, and the chunk is
dropped. No request ever holds [prompt_len, vocab].

A request asking for prompt logprobs takes no prefix from the prefix cache (a cached block has no
logits): the scheduler computes its whole prompt; its full blocks are cached for later requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trtc.runtime.outputs import Logprob


@dataclass
class ScoredRows:
    """One chunk's reduction, on the device."""

    logprobs: torch.Tensor  # [R] f32: log_softmax at the target
    ranks: torch.Tensor  # [R] int64: 1 + tokens more likely than the target (ties counted, as vLLM)
    top_values: torch.Tensor  # [R, k] f32 log_softmax, most likely first
    top_ids: torch.Tensor  # [R, k] int64


def score_rows(logits: torch.Tensor, targets: torch.Tensor, k: int) -> ScoredRows:
    """logits: [R, vocab] f32; targets: [R] int64 -> the targets' log_softmax and rank, and the top k.
    log_softmax is taken as logits - logsumexp (what log_softmax computes), without a second
    [R, vocab] copy."""
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [R, 1]
    target = logits.gather(1, targets[:, None])  # [R, 1]
    ranks = (logits >= target).sum(dim=-1)  # [R]
    values, ids = logits.topk(k, dim=-1) if k else (logits[:, :0], targets[:, None][:, :0])
    return ScoredRows((target - lse).squeeze(1), ranks, values - lse, ids)


@dataclass
class PromptScoring:
    """One step's prompt rows to score: for each scoring request (batch row `i`, `count` rows from
    position `start`), the row indices into the fed tokens and the target token ids."""

    requests: list[tuple[int, int, int]]  # (batch row, first position scored, rows)
    token_rows: np.ndarray  # [P] index into the step's fed tokens
    targets: np.ndarray  # [P] the prompt token each row predicts
    top_n: int  # the largest top N asked for in the step


def plan_scoring(batch, ends: np.ndarray, query_lens: np.ndarray, reqs: list) -> PromptScoring | None:
    """The rows of this step's prefill chunks whose next prompt token is still to be scored.
    reqs: the RequestState of each batch row (prompt_logprobs: the list filled so far)."""
    plan, rows, targets, top_n = [], [], [], 0
    for i, r in enumerate(reqs):
        if r.prompt_logprobs is None:
            continue
        n = int(query_lens[i])
        first = int(ends[i]) - n + 1
        p0 = int(batch.positions[first])
        lo, hi = max(p0, len(r.prompt_logprobs) - 1), min(p0 + n, len(r.prompt_ids) - 1)  # rows lo..hi-1
        if lo >= hi:
            continue
        plan.append((i, lo, hi - lo))
        rows.append(np.arange(first + lo - p0, first + hi - p0))
        targets.append(np.asarray(r.prompt_ids[lo + 1 : hi + 1]))
        top_n = max(top_n, r.params.prompt_logprobs)
    if not plan:
        return None
    return PromptScoring(plan, np.concatenate(rows), np.concatenate(targets), top_n)


def position_logprobs(target: int, logprob: float, rank: int, top_ids: list[int], top_values: list[float],
                      n: int) -> dict[int, Logprob]:
    """One position's entry: the prompt's token first, then the n most likely (rank 1..n)."""
    entry = {target: Logprob(logprob, rank)}
    for j, (t, v) in enumerate(zip(top_ids[:n], top_values[:n])):
        entry.setdefault(t, Logprob(v, j + 1))
    return entry
