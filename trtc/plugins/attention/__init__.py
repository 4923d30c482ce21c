"""Attention ops over the paged KV cache. Each runs its Triton kernel on CUDA bf16/fp16 tensors and
its PyTorch reference otherwise (CPU, other cache dtypes):

    q, k = rope_and_write_kv(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping)
    out = paged_attention(q, k_cache, v_cache, meta, scale, sliding_window, soft_cap)

Kernels: `triton_rope_kv.py` (RoPE fused with the cache write), `triton_decode.py` (split-KV decode,
GQA grouped), `triton_prefill.py` (varlen causal prefill over a cached prefix). References: `rope.py`,
`paged.py`, `reference.py`.
"""

from __future__ import annotations

import torch

from trtc.plugins.attention import paged
from trtc.plugins.attention.rope import apply_rope
from trtc.plugins.dispatch import use_triton


def rope_and_write_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D]; k, v: [T, Hkv, D]; cos, sin: [max_seq_len, D] tables (activation dtype) read at
    positions [T]; k_cache, v_cache: [num_blocks, tokens_per_block, Hkv, D]. Writes rotated k and v at
    slot_mapping [T]; returns (q_rot, k_rot)."""
    if use_triton(q, k, v, cos, sin, k_cache, v_cache):
        from trtc.plugins.attention.triton_rope_kv import rope_and_write_kv as kernel

        return kernel(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping)
    cos_t, sin_t = cos[positions], sin[positions]
    q, k = apply_rope(q, cos_t, sin_t), apply_rope(k, cos_t, sin_t)
    paged.write_kv(k_cache, v_cache, k, v, slot_mapping)
    return q, k


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float,
    sliding_window: int | None = None, soft_cap: float | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [T, Hq, D] of a mixed batch described by meta (an AttentionMetadata: the first
    meta.num_decodes sequences are decodes, the rest prefill chunks over a cached prefix, their K/V
    already in the cache). Returns out [T, Hq, D] (written into `out` when given, e.g. a CUDA graph's
static buffer). The decode-only case is CUDA-graph capturable."""
    if use_triton(q, k_cache, v_cache):
        from trtc.plugins.attention.triton_decode import decode_attention
        from trtc.plugins.attention.triton_prefill import prefill_attention

        out = torch.empty_like(q) if out is None else out
        num_seqs, nd = meta.context_lens_tensor.shape[0], meta.num_decodes
        if nd:
            decode_attention(q[:nd], k_cache, v_cache, meta.block_tables, meta.context_lens_tensor, scale,
                             sliding_window, soft_cap, out=out[:nd])
        if num_seqs > nd:
            prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.context_lens_tensor,
                              nd, num_seqs - nd, meta.max_query_len, scale, sliding_window, soft_cap, out=out)
        return out
    ref = paged.paged_attention(
        q, k_cache, v_cache, meta.block_tables, meta.query_lens, meta.context_lens, meta.positions,
        scale, sliding_window, soft_cap,
    )
    return ref if out is None else out.copy_(ref)


__all__ = ["paged_attention", "rope_and_write_kv"]
