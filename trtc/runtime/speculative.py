"""Speculative decoding: draft tokens proposed for a decoding request are fed with its last token in one
target step, and the target's logits at those positions decide how many of them it keeps.

Proposers: `ngram` (prompt lookup, as vLLM's and TensorRT-LLM's: the request's last n tokens, n from
prompt_lookup_max down to prompt_lookup_min, are looked up earlier in its prompt + output, and the
tokens that followed their latest occurrence are the draft; no model).

Verification (`verify`): greedy requests keep the draft tokens that equal the target's argmax and then
take the target's own token, so the output is token for token the non-speculative one. Sampling requests
use rejection sampling (Leviathan et al. 2023, Chen et al. 2023) with the proposer's distribution q, which
for a proposer without a model is one-hot on its token: draft token x is kept with probability p(x) (p the
target's distribution after every processor of the request: penalties over the tokens before that
position, temperature, top-k, top-p, min-p, logit bias); at the first rejection the token is drawn from
p with x removed (max(p - q, 0), renormalized); if all are kept, one more is drawn from p at the next
position. Each emitted token is then distributed exactly as the target alone would draw it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from trtc.errors import TrtcError
from trtc.plugins.sampling.sampler import SamplingBatch, apply_penalties, apply_warpers

MODES = ("ngram", "draft_target")


@dataclass(frozen=True)
class SpeculativeConfig:
    """mode: the proposer (ngram, or draft_target: a draft engine of the same vocabulary at
    draft_engine_dir, trtc/runtime/draft_model.py). max_draft_len: draft tokens per step at most
    (TensorRT-LLM's --max_draft_len, vLLM's num_speculative_tokens). prompt_lookup_min / _max: n-gram
    sizes looked up."""

    mode: str = "ngram"
    max_draft_len: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 3
    draft_engine_dir: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise TrtcError(f"speculative decoding mode {self.mode!r} is not one trtc has; use one of {', '.join(MODES)}")
        if not 1 <= self.max_draft_len <= 16:
            raise TrtcError(f"--max_draft_len {self.max_draft_len}: pass 1 to 16 draft tokens per step")
        if (self.mode == "draft_target") != (self.draft_engine_dir is not None):
            raise TrtcError("--draft_engine_dir is the draft_target mode's draft engine: pass both or neither")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise TrtcError(f"prompt_lookup_min {self.prompt_lookup_min} / prompt_lookup_max {self.prompt_lookup_max}: "
                            "pass 1 <= min <= max")


def speculative_config(mode: str | None, max_draft_len: int | None,
                       draft_engine_dir: str | None = None) -> SpeculativeConfig | None:
    """The config of --speculative_decoding_mode / --max_draft_len (default 4) / --draft_engine_dir, or
    None without a mode."""
    if mode is None:
        if max_draft_len is not None or draft_engine_dir is not None:
            raise TrtcError("--max_draft_len and --draft_engine_dir set speculative decoding's drafts; add "
                            "--speculative_decoding_mode ngram or draft_target")
        return None
    return SpeculativeConfig(mode, max_draft_len or 4, draft_engine_dir=draft_engine_dir)


def ngram_draft(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """tokens: [L] the request's prompt + output. The up to k tokens that followed the latest earlier
    occurrence of its last n tokens, for the largest n in [n_min, n_max] that occurs; [] if none does."""
    length = len(tokens)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: length - 1], n)  # [L - n, n], the suffix excluded
        hits = np.flatnonzero((windows == tokens[length - n :]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []


@dataclass
class SpecStats:
    """Counters since the executor started (vLLM's spec_decode metrics)."""

    num_drafts: int = 0  # requests-steps that fed a draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a speculating request gets per target step: 1 + accepted drafts per draft."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0


def verify(logits: torch.Tensor, drafts: Sequence[Sequence[int]], sampling: SamplingBatch) -> list[list[int]]:
    """logits: [R, V], for each speculating request its 1 + len(draft) rows in order (row j predicts
    the token after draft[:j]); sampling: R rows, each with the penalties' view of the tokens before it.
    Returns each request's emitted tokens: its kept draft tokens and one token of the target's."""
    penalized = apply_penalties(logits.float(), sampling)  # [R, V]
    greedy_rows = penalized.argmax(dim=-1).tolist()
    sampled_rows = [i for i, g in enumerate(sampling.greedy) if not g]
    probs = apply_warpers(penalized[sampled_rows], sampling.rows_at(sampled_rows)).softmax(dim=-1) if sampled_rows else None
    where = {row: j for j, row in enumerate(sampled_rows)}
    out, row = [], 0
    for draft in drafts:
        if sampling.greedy[row]:
            emitted = []
            for j, x in enumerate(draft):
                emitted.append(greedy_rows[row + j])
                if greedy_rows[row + j] != x:
                    break
            else:
                emitted.append(greedy_rows[row + len(draft)])
        else:
            emitted = _rejection_sample(probs, [where[row + j] for j in range(len(draft) + 1)], draft,
                                        sampling.generators[row])
        out.append(emitted)
        row += len(draft) + 1
    return out


def _rejection_sample(probs: torch.Tensor, rows: list[int], draft: Sequence[int],
                      generator: torch.Generator | None) -> list[int]:
    """probs: [*, V] target distributions; rows: this request's 1 + len(draft) rows of them."""
    p_draft = probs[rows[:-1], list(draft)].tolist() if draft else []
    u = torch.rand(len(draft), generator=generator, device=probs.device).tolist() if draft else []
    emitted = []
    for j, x in enumerate(draft):
        if u[j] < p_draft[j]:
            emitted.append(int(x))
            continue
        residual = probs[rows[j]].clone()
        residual[x] = 0.0  # max(p - q, 0) with q one-hot on x
        if not residual.sum() > 0:  # p(x) == 1 up to rounding: x is the only token p can draw
            emitted.append(int(x))
            continue
        emitted.append(int(torch.multinomial(residual, 1, generator=generator)))  # multinomial renormalizes
        return emitted
    emitted.append(int(torch.multinomial(probs[rows[-1]], 1, generator=generator)))
    return emitted
