"""Per-step attention data, passed explicitly to the model (no global state in model code)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] absolute position of each new token
    slot_mapping: torch.Tensor  # [T] KV-cache slot each new token's K/V is written to
    block_tables: torch.Tensor  # [B, max_blocks] block ids per sequence, -1 padded
    query_lens: list[int]  # [B] new tokens per sequence (1 for decode, a chunk for prefill)
    context_lens: list[int]  # [B] cached + new tokens per sequence

    @classmethod
    def from_batch(cls, batch, device: torch.device) -> "AttentionMetadata":
        """From a ScheduledBatch of the C++ scheduler (numpy arrays)."""
        return cls(
            positions=torch.from_numpy(np.asarray(batch.positions, dtype=np.int64)).to(device),
            slot_mapping=torch.from_numpy(np.asarray(batch.slot_mapping, dtype=np.int64)).to(device),
            block_tables=torch.from_numpy(np.asarray(batch.block_tables, dtype=np.int64)).to(device),
            query_lens=np.asarray(batch.query_lens).tolist(),
            context_lens=np.asarray(batch.context_lens).tolist(),
        )
