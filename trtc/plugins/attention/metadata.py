"""Per-step attention data, passed explicitly to the model (no global state in model code)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AttentionMetadata:
    """Sequences in batch order: the first `num_decodes` are decodes (query_len 1), then prefill chunks."""

    positions: torch.Tensor  # [T] absolute position of each new token
    slot_mapping: torch.Tensor  # [T] KV-cache slot each new token's K/V is written to
    block_tables: torch.Tensor  # [B, max_blocks] int32 block ids per sequence, -1 padded
    query_lens: list[int]  # [B] new tokens per sequence (1 for decode, a chunk for prefill)
    context_lens: list[int]  # [B] cached + new tokens per sequence
    # For the kernels (device tensors and host ints, so they launch without reading the device):
    query_start_loc: torch.Tensor | None = None  # [B + 1] int32, cumulative query_lens from 0
    context_lens_tensor: torch.Tensor | None = None  # [B] int32, context_lens on the device
    num_decodes: int = 0  # leading sequences with query_len 1 that are decodes
    max_query_len: int = 0  # longest chunk of the batch
    # [B] each sequence's whole known length (prompt + generated), which picks LongRoPE's factors;
    # None: context_lens (a prefill chunk that is not the last of its prompt is short of it)
    seq_lens: list[int] | None = None

    def __post_init__(self) -> None:
        device = self.positions.device
        if self.query_start_loc is None:
            self.query_start_loc = torch.tensor(np.concatenate([[0], np.cumsum(self.query_lens)]), dtype=torch.int32, device=device)
        if self.context_lens_tensor is None:
            self.context_lens_tensor = torch.tensor(self.context_lens, dtype=torch.int32, device=device)
        if not self.max_query_len and self.query_lens:
            self.max_query_len = max(self.query_lens)

    @classmethod
    def from_step(cls, step, device: torch.device) -> AttentionMetadata:
        """From a runtime step's host arrays (trtc/runtime/parallel/step.py `Step`)."""
        query_lens = np.asarray(step.query_lens, dtype=np.int32)
        context_lens = np.asarray(step.context_lens, dtype=np.int32)
        return cls(
            positions=torch.from_numpy(np.asarray(step.positions, dtype=np.int64)).to(device),
            slot_mapping=torch.from_numpy(np.asarray(step.slot_mapping, dtype=np.int64)).to(device),
            block_tables=torch.from_numpy(np.asarray(step.block_tables, dtype=np.int32)).to(device),
            query_lens=query_lens.tolist(),
            context_lens=context_lens.tolist(),
            query_start_loc=torch.from_numpy(np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)).to(device),
            context_lens_tensor=torch.from_numpy(context_lens).to(device),
            num_decodes=int(step.num_decode_tokens),
            max_query_len=int(query_lens.max(initial=0)),
            seq_lens=np.asarray(step.seq_lens, dtype=np.int64).tolist(),
        )
