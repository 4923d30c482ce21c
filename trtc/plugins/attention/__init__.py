"""Attention ops over the paged KV cache. Each runs its Triton kernel on CUDA bf16/fp16 tensors and
its PyTorch reference otherwise (CPU, other dtypes):

    q, k = rope_and_write_kv(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    out = paged_attention(q, k_cache, v_cache, meta, scale, sliding_window, soft_cap, k_scale=, v_scale=)

The pool is in the activation dtype, or FP8 (float8_e4m3fn) with one float32 scale each for K and V
per layer (trtc/formats/quant_layout.py); the kernels quantize on write and dequantize on read.

Kernels: `triton_rope_kv.py` (RoPE fused with the cache write), `triton_decode.py` (split-KV decode,
GQA grouped), `triton_prefill.py` (varlen causal prefill over a cached prefix); on the CPU, `cpu.py`
(torch's fused attention, the decodes batched). References: `rope.py`, `paged.py`, `reference.py`.
"""

from __future__ import annotations

import torch

from trtc.formats.quant_layout import FP8
from trtc.plugins.attention import paged
from trtc.plugins.attention.rope import apply_rope
from trtc.plugins.dispatch import use_triton

DecodeTactics = dict[str, dict[int, dict]]  # key -> {tuned batch size: {"block_n", "num_warps"}}


def decode_tactics(config: dict[str, dict[str, dict]] | None) -> DecodeTactics:
    """An engine's decode-attention tactics from config.json's tactics["decode_attention"]."""
    return {key: {int(b): cfg for b, cfg in per_batch.items()} for key, per_batch in (config or {}).items()}


def decode_tactic_key(q_heads: int, kv_heads: int, head_dim: int, kv_dtype: torch.dtype) -> str:
    return f"decode:hq{q_heads}:hkv{kv_heads}:d{head_dim}:{str(kv_dtype).removeprefix('torch.')}"


def _decode_tactic(q: torch.Tensor, k_cache: torch.Tensor, batch: int, tactics: DecodeTactics | None) -> dict:
    """The tuned {"block_n", "num_warps"} of the smallest tuned batch size >= batch, or {}."""
    per_batch = (tactics or {}).get(decode_tactic_key(q.shape[1], k_cache.shape[2], q.shape[2], k_cache.dtype))
    if not per_batch:
        return {}
    return per_batch[min((b for b in per_batch if b >= batch), default=max(per_batch))]


def _kernels_take(q: torch.Tensor, k_cache: torch.Tensor, *tensors: torch.Tensor) -> bool:
    return use_triton(q, *tensors) and k_cache.is_cuda and k_cache.dtype in (q.dtype, FP8)


def rope_and_write_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D]; k, v: [T, Hkv, D]; cos, sin: [max_seq_len, D] tables (activation dtype) read at
    positions [T]; k_cache, v_cache: [num_blocks, tokens_per_block, Hkv, D]. Writes rotated k and v at
    slot_mapping [T] (quantized with k_scale, v_scale: float32 [] into an FP8 pool); returns (q_rot, k_rot).
    cos, sin None: a layer without RoPE (k and v are written as they are); tables narrower than D: a
    partial rotary (the dims past their width pass through)."""
    if cos is None:
        paged.write_kv(k_cache, v_cache, k, v, slot_mapping, k_scale, v_scale)
        return q, k
    if _kernels_take(q, k_cache, k, v, cos, sin):
        from trtc.plugins.attention.triton_rope_kv import rope_and_write_kv as kernel

        return kernel(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
    cos_t, sin_t = cos[positions], sin[positions]
    q, k = apply_rope(q, cos_t, sin_t), apply_rope(k, cos_t, sin_t)
    paged.write_kv(k_cache, v_cache, k, v, slot_mapping, k_scale, v_scale)
    return q, k


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float,
    sliding_window: int | None = None, soft_cap: float | None = None, out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, tactics: DecodeTactics | None = None,
    k: torch.Tensor | None = None, v: torch.Tensor | None = None, decode_kv=None, layer: int = 0,
) -> torch.Tensor:
    """q: [T, Hq, D] of a mixed batch described by meta (an AttentionMetadata: the first
    meta.num_decodes sequences are decodes, the rest prefill chunks over a cached prefix, their K/V
    already in the cache). Returns out [T, Hq, D] (written into `out` when given, e.g. a CUDA graph's
static buffer). An FP8 pool takes k_scale and v_scale; tactics: the engine's tuned decode tactics.
The decode-only case is CUDA-graph capturable. On the CPU, k, v [T, Hkv, D] (the step's new keys and
values as written) spare whole-prompt prefills the pool's read-back, and decode_kv (a cpu.DecodeKV,
`layer` this layer's) spares decodes the gather of every context each step."""
    if _kernels_take(q, k_cache):
        from trtc.plugins.attention.triton_decode import decode_attention
        from trtc.plugins.attention.triton_prefill import prefill_attention

        out = torch.empty_like(q) if out is None else out
        num_seqs, nd = meta.context_lens_tensor.shape[0], meta.num_decodes
        if nd:
            decode_attention(q[:nd], k_cache, v_cache, meta.block_tables, meta.context_lens_tensor, scale,
                             sliding_window, soft_cap, out=out[:nd], k_scale=k_scale, v_scale=v_scale,
                             **_decode_tactic(q, k_cache, nd, tactics))
        if num_seqs > nd:
            prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.context_lens_tensor,
                              nd, num_seqs - nd, meta.max_query_len, scale, sliding_window, soft_cap, out=out,
                              k_scale=k_scale, v_scale=v_scale)
        return out
    if q.device.type == "cpu" and soft_cap is None:  # batched through torch's fused attention
        from trtc.plugins.attention import cpu

        res = cpu.paged_attention(q, k_cache, v_cache, meta, scale, sliding_window, k_scale, v_scale, k, v,
                                  decode_kv, layer)
        return res if out is None else out.copy_(res)
    ref = paged.paged_attention(
        q, k_cache, v_cache, meta.block_tables, meta.query_lens, meta.context_lens, meta.positions,
        scale, sliding_window, soft_cap, k_scale, v_scale,
    )
    return ref if out is None else out.copy_(ref)


__all__ = ["paged_attention", "rope_and_write_kv"]
