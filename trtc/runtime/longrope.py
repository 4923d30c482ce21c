"""LongRoPE (Phi-3 / Phi-4) across the original context, as HF transformers' `generate` does it.

A LongRoPE model rotates q and k with its short factors while a sequence is within
original_max_position_embeddings (`context`) and with its long factors past it. The choice is per
sequence, by its whole known length (prompt + generated tokens): every chunk of a long prompt's
prefill is long; the model runner reads each token's cos/sin row accordingly
(ModelRunner.long_rope_rows), so a batch mixing short and long sequences gives each the factors it
would have alone.

A sequence that grows past the context has its first `context` keys cached with the short factors.
HF's `Phi3ForCausalLM.prepare_inputs_for_generation` drops the cache at that step (the input
reaches context + 1 tokens while at most `context` are cached) and recomputes the whole sequence
with the long factors. The executor does the same: before the step whose decode feeds position
`context`, `crossing_recompute_steps` gives prefill steps that recompute that sequence's K/V of
positions [0, context) with the long factors into its own blocks (chunks of max_num_tokens, no
logits); the decode then runs as scheduled. Its blocks must be its own, so a LongRoPE engine runs
without prefix reuse (cached keys depend on the sequence's length, not on the prefix alone).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from trtc.runtime.parallel.step import Step


def crossing_recompute_steps(
    step: Step, known_tokens: Callable[[int], list[int]], context: int, max_num_tokens: int, tokens_per_block: int
) -> list[Step]:
    """known_tokens(i): the prompt + generated tokens of the step's sequence i. The steps that
    recompute, with the long factors, the cached K/V of every decode of `step` that crosses
    `context` (feeds position `context`)."""
    out = []
    for i in range(step.num_decode_tokens):  # decodes come first, one token each
        if int(step.positions[i]) != context:
            continue
        table = np.asarray(step.block_tables[i])  # [W]; blocks up to position `context` are allocated
        for start in range(0, context, max_num_tokens):
            end = min(context, start + max_num_tokens)
            positions = np.arange(start, end, dtype=np.int32)  # [n]
            slots = table[positions // tokens_per_block] * tokens_per_block + positions % tokens_per_block
            out.append(Step(
                input_ids=np.asarray(known_tokens(i)[start:end], np.int32), positions=positions,
                slot_mapping=slots.astype(np.int32), block_tables=table[None, :],
                query_lens=np.asarray([end - start], np.int32), context_lens=np.asarray([end], np.int32),
                seq_lens=np.asarray([context + 1], np.int32), logits_indices=np.zeros(0, np.int32),
                num_decode_tokens=0, num_prefill_tokens=end - start,
            ))
    return out
