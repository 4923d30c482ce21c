"""Paged KV cache: the write of new K/V into their slots, and attention over a block table.

Reference implementations (any device torch has); they define the layout the fast kernels use:
    k_cache, v_cache: [num_blocks, tokens_per_block, kv_heads, head_dim]
    slot of a token = block_id * tokens_per_block + offset in its block
An FP8 pool (float8_e4m3fn, trtc/formats/quant_layout.py) holds fp8(k / k_scale) and fp8(v / v_scale)
with one float32 scale per layer; reading multiplies the scale back.
"""

from __future__ import annotations

import torch

from trtc.formats.quant_layout import dequantize_fp8, quantize_fp8
from trtc.plugins.attention.reference import attention


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    # k, v: [T, kv_heads, head_dim]; slot_mapping: [T]; scales: float32 [] for an FP8 pool
    if k_scale is not None:  # fp8 has no index_copy on CPU: copy its bytes
        k, v = quantize_fp8(k, k_scale).view(torch.uint8), quantize_fp8(v, v_scale).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping.long(), k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping.long(), v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    positions: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each sequence's new queries over its cached keys (the new ones already written).

    q: [T, Hq, D] for the sequences concatenated; block_tables: [B, max_blocks];
    query_lens, context_lens: per sequence (context = cached + new tokens); positions: [T].
    Prefill chunks and decode tokens mix freely in one batch. Returns [T, Hq, D].
    """
    tpb = k_cache.shape[1]
    out = torch.empty_like(q)
    start = 0
    for b, (n, ctx) in enumerate(zip(query_lens, context_lens)):
        blocks = block_tables[b, : -(-ctx // tpb)].long()
        k = k_cache[blocks].flatten(0, 1)[:ctx]  # [ctx, Hkv, D]
        v = v_cache[blocks].flatten(0, 1)[:ctx]
        if k_scale is not None:  # FP8 pool
            k, v = dequantize_fp8(k, k_scale, q.dtype), dequantize_fp8(v, v_scale, q.dtype)
        out[start : start + n] = attention(
            q[start : start + n], k.to(q.dtype), v.to(q.dtype), positions[start : start + n], scale, sliding_window, soft_cap
        )
        start += n
    return out

