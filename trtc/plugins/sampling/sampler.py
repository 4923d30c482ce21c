"""Sampling op, plain PyTorch reference: runs on any device torch has; the fast kernel is checked against it.

One call per decode step turns the last-position logits of B requests into B tokens, each row with its
own parameters. Processing order is HF transformers `generate`'s, each step matching HF's own
processor (tests/plugins/test_sampling.py checks them one by one):

    logit bias           OpenAI: {token id: bias} added to the row's logits (vLLM: before the penalties)
    repetition penalty   HF: over prompt + output tokens, logit < 0 → logit * p, else logit / p
    presence/frequency   OpenAI/vLLM: over output tokens, logit -= presence * (count > 0) + frequency * count
    temperature          logit / T
    top-k                drop logits < the k-th largest (ties with the k-th are kept, as in HF)
    top-p                drop the smallest tokens whose cumulative probability is <= 1 - p (HF)
    min-p                drop tokens with probability < min_p * max probability
    draw                 greedy rows: argmax; others: a categorical draw with the row's generator

The draw is the exponential race `argmax(probs / q)`, q ~ Exp(1) i.i.d. per token, which is exactly a
draw from `probs`. Drawing the noise `q` apart from using it lets a fast kernel be checked token for
token against this reference: pass the same `noise` to both. Each sampling row draws its noise from its
own generator (or, when it has none, from the device's default generator), so a seeded request gives the
same tokens whatever else is in the batch; greedy rows draw nothing.

Logprobs are vLLM's default: log-softmax of the raw logits (before any processing, the bias included) at
the chosen token.
Everything is computed in float32 whatever the logits' dtype.

The [B, V] temporaries (a sort's values and indices, softmax, cumulative sums, noise) are built for
SAMPLING_CHUNK_ROWS rows at a time, so that a batch of 2048 rows over a 128K vocabulary holds one
chunk's worth (the memory plan counts it), not ten gigabytes. Rows are independent: a chunked batch
samples what the whole batch would (seeded rows token for token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # the op needs only the fields; no import of the runtime package at run time
    from trtc.runtime.sampling_params import SamplingParams

SAMPLING_CHUNK_ROWS = 256  # rows whose [rows, V] temporaries are live at once


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling parameters of one step, on the logits' device.

    A per-row tensor is None when its processor is off for every row, so the op skips it (the [B, V]
    tensors are then never built). Greedy rows carry neutral values for temperature/top-k/top-p/min-p.
    """

    greedy: list[bool]  # [B] host: greedy rows take argmax and draw no noise
    generators: list[torch.Generator | None]  # [B] seeded generator per row, persisting across steps
    temperature: Tensor | None = None  # [B] f32 > 0; 1 = off
    top_k: Tensor | None = None  # [B] i64; 0 = off
    top_p: Tensor | None = None  # [B] f32 in (0, 1]; 1 = off
    min_p: Tensor | None = None  # [B] f32 in [0, 1]; 0 = off
    repetition_penalty: Tensor | None = None  # [B] f32 > 0; 1 = off
    # [B, V] bool: token seen in prompt or output; built only with repetition_penalty
    prompt_mask: Tensor | None = field(default=None, repr=False)
    presence_penalty: Tensor | None = None  # [B] f32; 0 = off
    frequency_penalty: Tensor | None = None  # [B] f32; 0 = off
    # [B, V] f32: times each token was generated (f32 so the penalty is one expression; exact below 2**24);
    # built only with presence/frequency penalties
    output_counts: Tensor | None = field(default=None, repr=False)
    # logit bias, sparse: (rows [N] i64, token ids [N] i64, biases [N] f32); built only when a row has one
    logit_bias: tuple[Tensor, Tensor, Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_requests(
        cls,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingBatch:
        """Build the batch for the scheduled requests (row i = request i). Token ids >= vocab_size are
        ignored by the penalties (they cannot be generated; HF drops them the same way)."""
        n = len(params)
        if not (len(prompt_ids) == len(output_ids) == len(generators) == n):
            raise ValueError(
                f"from_requests needs one entry per request, got {n} params, {len(prompt_ids)} prompts, "
                f"{len(output_ids)} outputs, {len(generators)} generators"
            )
        greedy = [p.is_greedy for p in params]

        def per_row(name: str, off, dtype: torch.dtype, off_when_greedy: bool = False) -> Tensor | None:
            values = [
                off if (g and off_when_greedy) or getattr(p, name) is None else getattr(p, name)
                for p, g in zip(params, greedy)
            ]
            return None if all(v == off for v in values) else torch.tensor(values, dtype=dtype, device=device)

        f32, i64 = torch.float32, torch.int64
        batch = cls(
            greedy=greedy,
            generators=list(generators),
            temperature=per_row("temperature", 1.0, f32, off_when_greedy=True),  # unset → 1.0 when sampling
            top_k=per_row("top_k", 0, i64, off_when_greedy=True),
            top_p=per_row("top_p", 1.0, f32, off_when_greedy=True),
            min_p=per_row("min_p", 0.0, f32, off_when_greedy=True),
            repetition_penalty=per_row("repetition_penalty", 1.0, f32),  # penalties apply to greedy rows too
            presence_penalty=per_row("presence_penalty", 0.0, f32),
            frequency_penalty=per_row("frequency_penalty", 0.0, f32),
        )
        biases = [(i, t, b) for i, p in enumerate(params) for t, b in (getattr(p, "logit_bias", None) or {}).items()
                  if 0 <= t < vocab_size]
        if biases:
            rows, toks, values = zip(*biases)
            batch.logit_bias = (torch.tensor(rows, dtype=i64, device=device), torch.tensor(toks, dtype=i64, device=device),
                                torch.tensor(values, dtype=f32, device=device))
        if batch.repetition_penalty is not None:
            seen = [list(a) + list(b) for a, b in zip(prompt_ids, output_ids)]
            batch.prompt_mask = torch.zeros(n, vocab_size, dtype=torch.bool, device=device)
            batch.prompt_mask.index_put_(_token_index(seen, vocab_size, device), torch.tensor(True, device=device))
        if batch.presence_penalty is not None or batch.frequency_penalty is not None:
            batch.output_counts = torch.zeros(n, vocab_size, dtype=torch.float32, device=device)
            batch.output_counts.index_put_(
                _token_index(output_ids, vocab_size, device), torch.tensor(1.0, device=device), accumulate=True
            )
        return batch

    def rows(self, start: int, stop: int) -> SamplingBatch:
        """The batch of rows start..stop-1."""
        return self.rows_at(range(start, min(stop, len(self.greedy))))

    def rows_at(self, index: Sequence[int]) -> SamplingBatch:
        """The batch of rows `index`, in that order (copies of the per-row tensors)."""
        sub = {name: getattr(self, name) for name in self.__slots__}
        pick = None
        for name, value in sub.items():
            if isinstance(value, Tensor):
                pick = pick if pick is not None else torch.tensor(list(index), dtype=torch.int64, device=value.device)
                sub[name] = value[pick]
        sub["greedy"] = [self.greedy[i] for i in index]
        sub["generators"] = [self.generators[i] for i in index]
        if self.logit_bias is not None:
            where = {row: j for j, row in enumerate(index)}
            rows, toks, values = self.logit_bias
            keep = [k for k, r in enumerate(rows.tolist()) if r in where]
            sub["logit_bias"] = None if not keep else (
                torch.tensor([where[r] for r in rows[keep].tolist()], dtype=torch.int64, device=rows.device),
                toks[keep], values[keep])
        return SamplingBatch(**sub)

    def append_tokens(self, tokens: Tensor) -> None:
        """Record the tokens just sampled (tokens: [B] i64), so the same batch serves the next step when
        the same requests are scheduled again in the same rows. Otherwise rebuild with from_requests."""
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        if self.prompt_mask is not None:
            self.prompt_mask[rows, tokens] = True
        if self.output_counts is not None:
            self.output_counts.index_put_((rows, tokens), torch.tensor(1.0, device=tokens.device), accumulate=True)


def _token_index(ids: Sequence[Sequence[int]], vocab_size: int, device) -> tuple[Tensor, Tensor]:
    """(row, token) index tensors for every in-vocab token of every row."""
    rows = [i for i, seq in enumerate(ids) for t in seq if 0 <= t < vocab_size]
    toks = [t for seq in ids for t in seq if 0 <= t < vocab_size]
    return (
        torch.tensor(rows, dtype=torch.int64, device=device),
        torch.tensor(toks, dtype=torch.int64, device=device),
    )


# ---- processors: logits [B, V] f32 in, new [B, V] f32 out; per-row parameters [B] -------------------


def apply_logit_bias(logits: Tensor, bias: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    # bias: (rows [N] i64, token ids [N] i64, biases [N] f32); a new tensor (the raw logits stay for logprobs)
    rows, tokens, values = bias
    return logits.index_put((rows, tokens), values, accumulate=True)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    # seen: [B, V] bool; penalty: [B] f32
    p = penalty[:, None]
    return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)


def apply_presence_frequency(
    logits: Tensor, counts: Tensor, presence: Tensor | None, frequency: Tensor | None
) -> Tensor:
    # counts: [B, V] f32; presence, frequency: [B] f32 (None = 0 for every row)
    penalty = torch.zeros_like(logits)
    if presence is not None:
        penalty = penalty + presence[:, None] * (counts > 0)
    if frequency is not None:
        penalty = penalty + frequency[:, None] * counts
    return logits - penalty


def apply_temperature(logits: Tensor, temperature: Tensor) -> Tensor:
    # temperature: [B] f32 > 0
    return logits / temperature[:, None]


def apply_top_k(logits: Tensor, top_k: Tensor) -> Tensor:
    # top_k: [B] i64, 0 = off; k > V keeps everything
    k = top_k.clamp(max=logits.shape[-1])
    k_max = int(k.max())  # host sync; fine for the reference
    if k_max == 0:
        return logits
    kth = logits.topk(k_max, dim=-1).values.gather(1, (k - 1).clamp(min=0)[:, None])  # [B, 1]
    kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, -torch.inf))
    return logits.masked_fill(logits < kth, -torch.inf)


def apply_top_p(logits: Tensor, top_p: Tensor) -> Tensor:
    # top_p: [B] f32 in (0, 1]; the most probable token is always kept
    sorted_logits, sorted_idx = logits.sort(dim=-1)  # ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)[:, None]
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, -torch.inf)


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    # min_p: [B] f32 in [0, 1]; the most probable token is always kept
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, -torch.inf)


def apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Logit bias, repetition, then presence/frequency penalties. logits: [B, V] f32 → [B, V] f32."""
    if batch.logit_bias is not None:
        logits = apply_logit_bias(logits, batch.logit_bias)
    if batch.repetition_penalty is not None:
        logits = apply_repetition_penalty(logits, batch.prompt_mask, batch.repetition_penalty)
    if batch.output_counts is not None:
        logits = apply_presence_frequency(logits, batch.output_counts, batch.presence_penalty, batch.frequency_penalty)
    return logits


def apply_warpers(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Temperature, top-k, top-p, min-p. logits: [B, V] f32 → [B, V] f32 (-inf where dropped)."""
    if batch.temperature is not None:
        logits = apply_temperature(logits, batch.temperature)
    if batch.top_k is not None:
        logits = apply_top_k(logits, batch.top_k)
    if batch.top_p is not None:
        logits = apply_top_p(logits, batch.top_p)
    if batch.min_p is not None:
        logits = apply_min_p(logits, batch.min_p)
    return logits


def process_logits(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Every processor in HF's order. logits: [B, V] any float dtype → [B, V] f32 whose softmax is the
    distribution each sampling row draws from (greedy rows: only penalties apply; they take its argmax)."""
    return apply_warpers(apply_penalties(logits.float(), batch), batch)


def draw_noise(batch: SamplingBatch, vocab_size: int, device: torch.device | str) -> Tensor:
    """Exp(1) noise for the race: [B, V] f32, drawn per row from the row's generator; unseeded rows draw
    together from the device's default generator; greedy rows draw nothing (their row is 1)."""
    noise = torch.ones(len(batch.greedy), vocab_size, dtype=torch.float32, device=device)
    unseeded = [i for i, g in enumerate(batch.greedy) if not g and batch.generators[i] is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), vocab_size, device=device).exponential_()
    for i, (g, gen) in enumerate(zip(batch.greedy, batch.generators)):
        if not g and gen is not None:
            noise[i].exponential_(generator=gen)
    return noise


def sample(logits: Tensor, batch: SamplingBatch, noise: Tensor | None = None,
           chunk_rows: int = SAMPLING_CHUNK_ROWS) -> tuple[Tensor, Tensor]:
    """logits: [B, V] any float dtype; noise: [B, V] f32 Exp(1) (None = draw_noise, per chunk).
    Returns tokens [B] i64 and their logprobs [B] f32 (log-softmax of the raw logits). Rows are
    processed chunk_rows at a time."""
    n = logits.shape[0]
    if n <= chunk_rows:
        return _sample(logits, batch, noise)
    parts = [_sample(logits[i : i + chunk_rows], batch.rows(i, i + chunk_rows),
                     None if noise is None else noise[i : i + chunk_rows]) for i in range(0, n, chunk_rows)]
    return torch.cat([t for t, _ in parts]), torch.cat([lp for _, lp in parts])


def _sample(logits: Tensor, batch: SamplingBatch, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    raw = logits.float()
    penalized = apply_penalties(raw, batch)
    if all(batch.greedy):
        tokens = penalized.argmax(dim=-1)
    else:
        probs = apply_warpers(penalized, batch).softmax(dim=-1)
        if noise is None:
            noise = draw_noise(batch, raw.shape[-1], raw.device)
        # q == 0 would make 0/0 = nan on a dropped token; the clamp moves the race by < 1e-38.
        tokens = (probs / noise.clamp(min=torch.finfo(torch.float32).tiny)).argmax(dim=-1)
        if any(batch.greedy):
            greedy = torch.tensor(batch.greedy, device=raw.device)
            tokens = torch.where(greedy, penalized.argmax(dim=-1), tokens)
    logprobs = raw.log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs


def token_logprobs(logits: Tensor, tokens: Tensor, chunk_rows: int = SAMPLING_CHUNK_ROWS) -> Tensor:
    """logits: [B, V]; tokens: [B] i64 -> [B] f32 log-softmax of each row at its token, chunk_rows
    rows of log-softmax at a time."""
    parts = [logits[i : i + chunk_rows].float().log_softmax(dim=-1).gather(1, tokens[i : i + chunk_rows, None]).squeeze(1)
             for i in range(0, logits.shape[0], chunk_rows)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float32, device=logits.device)


def top_logprobs(logits: Tensor, rows: Sequence[int], k: int,
                 chunk_rows: int = SAMPLING_CHUNK_ROWS) -> tuple[Tensor, Tensor]:
    """logits: [B, V]; rows: R row indices -> (values [R, k] f32, token ids [R, k] i64): each row's k
    most likely tokens under the log-softmax of its logits, chunk_rows rows at a time."""
    parts = [logits[list(rows[i : i + chunk_rows])].float().log_softmax(dim=-1).topk(k, dim=-1)
             for i in range(0, len(rows), chunk_rows)]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """The per-request generator for SamplingParams.seed (None → None: the device's default generator)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)
