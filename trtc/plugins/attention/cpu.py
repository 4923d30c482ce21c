"""Paged attention on the CPU: a step's decodes in one batched call, each prefill chunk in one call,
both through torch's fused scaled-dot-product attention (grouped-query heads without copies).

The per-sequence reference (paged.py) stays the oracle of every kernel; this path computes the same
attention (causal over each sequence's cached keys, sliding window) with a few large ops instead of
several small ones per sequence, which is what bounds a CPU step. Soft-capped attention keeps the
reference (torch's fused attention has no soft-cap).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trtc.formats.quant_layout import dequantize_fp8


def _gather(cache: torch.Tensor, tables: torch.Tensor, length: int, scale: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    """The first `length` cached tokens of each sequence: [B, Hkv, length, D] from cache
    [num_blocks, tokens_per_block, Hkv, D] through tables [B, W] (-1 padded)."""
    blocks = tables[:, : -(-length // cache.shape[1])].long().clamp_min(0)  # padding reads block 0, masked after
    kv = cache[blocks].flatten(1, 2)[:, :length]  # [B, length, Hkv, D]
    kv = dequantize_fp8(kv, scale, dtype) if scale is not None else kv.to(dtype)
    return kv.transpose(1, 2)


def _allowed(q_pos: torch.Tensor, length: int, sliding_window: int | None) -> torch.Tensor:
    """[..., length] bool: key j is visible from a query at q_pos[...] (causal, within the window)."""
    k_pos = torch.arange(length, device=q_pos.device)
    allowed = k_pos <= q_pos[..., None]
    if sliding_window is not None:
        allowed &= q_pos[..., None] - k_pos < sliding_window
    return allowed


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float,
    sliding_window: int | None = None, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [T, Hq, D] of a mixed batch described by meta (an AttentionMetadata: decodes first, then
    prefill chunks over a cached prefix, their K/V already in the pool). Returns [T, Hq, D]."""
    out = torch.empty_like(q)
    nd, context_lens = meta.num_decodes, meta.context_lens
    if nd:
        length = max(context_lens[:nd])
        k = _gather(k_cache, meta.block_tables[:nd], length, k_scale, q.dtype)  # [nd, Hkv, S, D]
        v = _gather(v_cache, meta.block_tables[:nd], length, v_scale, q.dtype)
        visible = _allowed(meta.positions[:nd], length, sliding_window)  # [nd, S]: also hides the padding
        out[:nd] = F.scaled_dot_product_attention(
            q[:nd, :, None], k, v, attn_mask=visible[:, None, None], scale=scale, enable_gqa=True
        ).squeeze(2)  # [nd, Hq, 1, D] -> [nd, Hq, D]
    start = nd
    for b in range(nd, len(context_lens)):
        n, length = meta.query_lens[b], context_lens[b]
        k = _gather(k_cache, meta.block_tables[b : b + 1], length, k_scale, q.dtype)  # [1, Hkv, S, D]
        v = _gather(v_cache, meta.block_tables[b : b + 1], length, v_scale, q.dtype)
        qb = q[start : start + n].transpose(0, 1)[None]  # [1, Hq, n, D]
        if n == length and sliding_window is None:  # a whole prompt: plain causal (the kernel skips the masked half)
            mask, causal = None, True
        else:  # a chunk over a cached prefix: query i sits at position length - n + i
            mask, causal = _allowed(meta.positions[start : start + n], length, sliding_window), False  # [n, S]
        out[start : start + n] = F.scaled_dot_product_attention(
            qb, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
        )[0].transpose(0, 1)
        start += n
    return out
