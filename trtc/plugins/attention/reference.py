"""Causal attention of new queries over a sequence's keys, with GQA, sliding window and soft-cap.

The oracle for the paged-KV kernels: plain matmuls and a float32 softmax (HF's eager attention).
"""

from __future__ import annotations

import torch


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """Attention of one sequence.

    q: [T, Hq, D] new queries at absolute positions q_positions [T];
    k, v: [S, Hkv, D] every key/value of the sequence so far, key j at position j.
    Returns [T, Hq, D].
    """
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) * scale  # [Hq, T, S]
    if soft_cap is not None:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    k_pos = torch.arange(k.shape[0], device=q.device)
    allowed = k_pos[None, :] <= q_positions[:, None]  # [T, S]
    if sliding_window is not None:
        allowed &= q_positions[:, None] - k_pos[None, :] < sliding_window
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.einsum("hts,shd->thd", probs, v)
