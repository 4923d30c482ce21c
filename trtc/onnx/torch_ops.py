"""The trtc ONNX ops (ops.py) in PyTorch, on the functions the cuda backend runs: the dispatch of
trtc/plugins (Triton kernels for CUDA bf16/fp16 tensors, the references otherwise). The
onnxruntime check calls them on CPU tensors, the TensorRT plugins on the engine's device buffers;
so the ONNX graph computes what the model runner computes, op for op."""

from __future__ import annotations

import torch

from trtc.plugins.attention import paged_attention as dispatch_attention
from trtc.plugins.attention import rope_and_write_kv
from trtc.plugins.attention.metadata import AttentionMetadata
from trtc.plugins.dispatch import use_triton
from trtc.plugins.gemm import linear
from trtc.plugins.gemm.w4a16 import SYMMETRIC_ZERO
from trtc.plugins.moe import run_experts


def step_metadata(slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                  query_start_loc: torch.Tensor, host: bool) -> AttentionMetadata:
    """The AttentionMetadata of the node's inputs, computed on their device without waiting on it.
    host: also the per-sequence lists the reference reads (a device-to-host copy); without it, what
    the kernels read, every sequence handled as a prefill chunk (a decode is a chunk of one)."""
    t = slot_mapping.shape[0]
    query_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()  # [B]
    first = torch.repeat_interleave(context_lens.long() - query_lens, query_lens, output_size=t)  # [T] chunk's first position
    chunk = torch.repeat_interleave(query_start_loc[:-1].long(), query_lens, output_size=t)  # [T] chunk's first token
    positions = first + torch.arange(t, device=slot_mapping.device) - chunk  # [T]
    if not host:
        return AttentionMetadata(positions, slot_mapping, block_tables, [], [], query_start_loc, context_lens,
                                 num_decodes=0, max_query_len=t)
    return AttentionMetadata(positions, slot_mapping, block_tables, query_lens.tolist(), context_lens.tolist(),
                             query_start_loc, context_lens)


def paged_attention(
    qkv: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor, kv_cache_pool: torch.Tensor,
    k_scale: torch.Tensor, v_scale: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, query_start_loc: torch.Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int,
    tokens_per_block: int, scale: float, sliding_window: int, soft_cap: float,
) -> torch.Tensor:
    """qkv: [T, (Hq + 2 Hkv) D]; rope_cos, rope_sin: [T, R] (R <= D); kv_cache_pool: [2, N, P, Hkv, D], written
    in place (k at [0], v at [1]: each a contiguous paged cache). Returns [T, Hq D]."""
    t, d = qkv.shape[0], head_dim
    q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    q, k, v = q.reshape(t, num_heads, d), k.reshape(t, num_kv_heads, d), v.reshape(t, num_kv_heads, d)
    k_cache, v_cache = kv_cache_pool[0], kv_cache_pool[1]  # [N, P, Hkv, D] each
    assert k_cache.shape[1] == tokens_per_block, (k_cache.shape, tokens_per_block)
    window, cap = sliding_window or None, soft_cap or None
    fp8_pool = kv_cache_pool.dtype == torch.float8_e4m3fn
    ks, vs = (k_scale, v_scale) if fp8_pool else (None, None)
    meta = step_metadata(slot_mapping, block_tables, context_lens, query_start_loc,
                         host=not (use_triton(q) and k_cache.is_cuda))
    token = torch.arange(t, device=qkv.device)  # rope_cos/sin are per token already
    q, _ = rope_and_write_kv(q, k, v, rope_cos, rope_sin, token, k_cache, v_cache, slot_mapping, ks, vs)
    return dispatch_attention(q, k_cache, v_cache, meta, scale, window, cap, k_scale=ks, v_scale=vs).reshape(t, -1)


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """x: [M, in]; weight: float8_e4m3fn [out, in] -> [M, out]."""
    return linear(x, {"l.weight": weight, "l.weight_scale": weight_scale, "l.input_scale": input_scale}, "l")


def w4a16_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, weight_zero: torch.Tensor, *,
               group_size: int) -> torch.Tensor:
    """x: [M, in]; weight: uint8 [out, in / 2]; weight_zero: [out, groups], or [] = 8 (symmetric)."""
    assert 2 * weight.shape[1] == group_size * weight_scale.shape[1], (weight.shape, weight_scale.shape, group_size)
    if weight_zero.dim() == 0:
        assert int(weight_zero) == SYMMETRIC_ZERO, int(weight_zero)
        weight_zero = None
    w = {"l.weight": weight, "l.weight_scale": weight_scale}
    if weight_zero is not None:
        w["l.weight_zero"] = weight_zero
    return linear(x, w, "l")


def moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, gate_up: torch.Tensor,
        gate_up_scale: torch.Tensor, gate_up_input_scale: torch.Tensor, down: torch.Tensor, down_scale: torch.Tensor,
        down_input_scale: torch.Tensor) -> torch.Tensor:
    """x: [T, H]; topk_weights, topk_ids: [T, k]; gate_up: [E, 2I, H]; down: [E, H, I] (FP8 with
    their scales, or x's dtype with [] scales that are not read) -> [T, H]."""
    experts = {"gate_up.weight": gate_up, "down.weight": down}
    if gate_up.dtype == torch.float8_e4m3fn:
        experts.update({"gate_up.weight_scale": gate_up_scale, "gate_up.input_scale": gate_up_input_scale,
                        "down.weight_scale": down_scale, "down.input_scale": down_input_scale})
    return run_experts(x, experts, topk_weights.float(), topk_ids.long())
