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

import torch
from tqdm import tqdm

from trtc.errors import TrtcError
from trtc.quantization.calibration import token_windows
from trtc.runtime.executor import Executor


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # summed over the scored tokens, in nats
    tokens: int


def prompt_logprobs(executor: Executor, prompts: list[list[int]]) -> list[torch.Tensor]:
    """For each prompt, the log-probability [len - 1] (float64) of token j + 1 given tokens 0..j:
    the runtime's prompt logprobs (`Executor.score`, SamplingParams.prompt_logprobs), the scoring
    path the server's echo / prompt_logprobs responses take too."""
    out = []
    for prompt, scored in zip(prompts, executor.score(prompts)):
        out.append(torch.tensor([entry[t].logprob for t, entry in zip(prompt[1:], scored[1:])], dtype=torch.float64))
    return out


def check_window_len(window_len: int, max_seq_len: int) -> None:
    if not 2 <= window_len < max_seq_len:
        raise TrtcError(f"--window_len {window_len} must be in [2, {max_seq_len - 1}] (below the engine's max_seq_len)")


def perplexity(
    executor: Executor, ids: list[int], window_len: int = 512, bos: int | None = None,
    max_tokens: int | None = None, windows_per_step: int = 8, progress: bool | None = False, desc: str = "eval",
) -> Perplexity:
    """Perplexity of the engine on the token ids (the text's, without BOS). `progress`: a bar of
    scored tokens (None: on a terminal only)."""
    check_window_len(window_len, executor.engine.build_config.max_seq_len)
    ids = ids[:max_tokens] if max_tokens is not None else ids
    windows = [w for w in token_windows(ids, window_len, bos) if len(w) >= 2]
    if not windows:
        raise TrtcError("the text has no token to score; pass a longer text")
    nll, count = 0.0, 0
    disable = None if progress is None else not progress
    with tqdm(total=sum(len(w) - 1 for w in windows), desc=desc, unit="tok", disable=disable, leave=False) as bar:
        for i in range(0, len(windows), windows_per_step):
            for lp in prompt_logprobs(executor, windows[i : i + windows_per_step]):
                nll -= float(lp.sum())
                count += len(lp)
                bar.update(len(lp))
    return Perplexity(math.exp(nll / count), nll, count)
