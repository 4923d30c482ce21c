"""One step's model inputs, as rank 0 sends them to the other ranks.

The executor plans each step from the scheduler's batch into a `Step`: the one batch type below
the executor. Every rank runs the same forward on the same inputs (its own shard of the weights and
of the KV heads), so the step carries exactly what the forward needs: the fed tokens, their
positions and KV slots, the block tables and lengths, and the rows whose logits are wanted. Each
rank's worker decides from the step alone whether a decode CUDA graph replays it, so every rank
makes the same choice (collectives are inside the graphs). Rank 0 runs from the same `Step` it sends.

On the wire (the control plane, gloo): one int32 message. Its first MESSAGE_INTS carry the header
and the start of the arrays, so that a step that fits (any decode batch of moderate size) costs
one broadcast; the rest, if any, follows in a second one.

    header  [kind (STOP or STEP), B, T, S, W, num_decode_tokens, num_prefill_tokens, payload_len]
    payload input_ids[T] positions[T] slot_mapping[T] block_tables[B*W] query_lens[B]
            context_lens[B] seq_lens[B] logits_indices[S]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

STOP, STEP = 0, 1
HEADER_INTS = 8
MESSAGE_INTS = 4096


@dataclass
class Step:
    """One step's model inputs, int32 numpy arrays: B sequences in batch order (decodes first, then
    prefill chunks), T fed tokens, S logits rows."""

    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T]
    block_tables: np.ndarray  # [B, W], -1 padded
    query_lens: np.ndarray  # [B]
    context_lens: np.ndarray  # [B]
    seq_lens: np.ndarray  # [B] each sequence's known tokens (a prefill chunk's context_len is short of it)
    logits_indices: np.ndarray  # [S] rows of the T tokens whose next-token logits are wanted
    num_decode_tokens: int
    num_prefill_tokens: int
    lora_slots: np.ndarray | None = None  # [B] each sequence's LoRA slot (-1: none), rank 0 only; None: no adapter

    @classmethod
    def from_batch(cls, batch, logits_indices: np.ndarray, seq_lens: np.ndarray,
                   lora_slots: np.ndarray | None = None) -> Step:
        """From the C++ scheduler's ScheduledBatch, the logits rows the executor wants, each
        sequence's known length (prompt + generated tokens) and LoRA slot."""
        return cls(
            batch.input_ids, batch.positions, batch.slot_mapping, np.asarray(batch.block_tables), batch.query_lens,
            batch.context_lens, np.asarray(seq_lens, np.int32), np.asarray(logits_indices, np.int32),
            int(batch.num_decode_tokens), int(batch.num_prefill_tokens), lora_slots,
        )

    @property
    def decode_only(self) -> bool:
        return self.num_prefill_tokens == 0 and len(self.query_lens) > 0

    def pack(self) -> np.ndarray:
        b, w = self.block_tables.shape if self.block_tables.ndim == 2 else (len(self.query_lens), 0)
        parts = [self.input_ids, self.positions, self.slot_mapping, self.block_tables.reshape(-1), self.query_lens,
                 self.context_lens, self.seq_lens, self.logits_indices]
        n = sum(len(p) for p in parts)
        header = [STEP, b, len(self.input_ids), len(self.logits_indices), w,
                  self.num_decode_tokens, self.num_prefill_tokens, n]
        return np.concatenate([np.asarray(header, np.int32)] + [np.asarray(p, np.int32).reshape(-1) for p in parts])

    @classmethod
    def unpack(cls, message: np.ndarray) -> Step:
        _, b, t, s, w, decodes, prefills, _ = (int(v) for v in message[:HEADER_INTS])
        sizes = [t, t, t, b * w, b, b, b, s]
        ends = np.cumsum([HEADER_INTS] + sizes)
        ids, pos, slots, tables, qlens, clens, slens, index = (message[ends[i] : ends[i + 1]] for i in range(len(sizes)))
        return cls(ids, pos, slots, tables.reshape(b, w), qlens, clens, slens, index, decodes, prefills)


def send_step(group, step: Step | None) -> None:
    """Rank 0: send `step` (None: stop) to the other ranks."""
    message = np.zeros(HEADER_INTS, np.int32) if step is None else step.pack()  # kind STOP is 0
    first = np.zeros(MESSAGE_INTS, np.int32)
    first[: min(len(message), MESSAGE_INTS)] = message[:MESSAGE_INTS]
    group.broadcast(torch.from_numpy(first))
    if len(message) > MESSAGE_INTS:
        group.broadcast(torch.from_numpy(np.ascontiguousarray(message[MESSAGE_INTS:])))


def receive_step(group) -> Step | None:
    """Another rank: the next step from rank 0 (None: stop)."""
    first = torch.empty(MESSAGE_INTS, dtype=torch.int32)
    group.broadcast(first)
    head = first.numpy()
    if head[0] == STOP:
        return None
    total = HEADER_INTS + int(head[HEADER_INTS - 1])
    if total <= MESSAGE_INTS:
        return Step.unpack(head[:total])
    rest = torch.empty(total - MESSAGE_INTS, dtype=torch.int32)
    group.broadcast(rest)
    return Step.unpack(np.concatenate([head, rest.numpy()]))
