"""Paged-KV decode attention (one new query per sequence): split-KV flash-decoding, GQA grouped (Triton).

Grid (sequences, kv heads, splits). A program loads the G = Hq / Hkv query heads that share its kv head
as one [G_PAD >= 16, D] tile, so each K/V row is read from memory once for the whole group, and walks
its share of the sequence's keys through the block table, BLOCK_N tokens at a time, with an online
softmax. The keys are split in-kernel from the sequence's own context length (each split gets
cdiv(context, splits) keys, rounded up to BLOCK_N), so all splits work whatever the length; with more
than one split, each writes a float32 partial output and its log-sum-exp and a second kernel merges them.

CUDA-graph safe: the launch depends only on tensor shapes (batch, heads, block-table width) and the
device; context lengths and block tables are read on the device. No host sync.
bytes ~= sum over sequences of context * Hkv * D * 2 * itemsize (K and V read once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # tanh through exp2, the same on every Triton version and in the interpreter
    e = tl.exp2(-2.0 * 1.4426950408889634 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit(do_not_specialize=["window", "num_splits"])
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    k_scale_ptr, v_scale_ptr, scale, soft_cap, window, num_splits,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    stride_ot, stride_oh,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, TPB: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_SOFT_CAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    heads = kv_head * G + g
    g_mask = g < G
    d_mask = d < D
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    lo = 0
    if HAS_WINDOW:  # the query sits at ctx - 1 and sees keys j with ctx - 1 - j < window
        lo = tl.maximum(ctx - window, 0)
    per_split = tl.cdiv(tl.cdiv(ctx - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, ctx)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    qk_scale = scale * 1.4426950408889634
    for n in range(start, end, BLOCK_N):
        offs = n + tl.arange(0, BLOCK_N)
        valid = offs < end
        block = tl.load(bt_row + offs // TPB, mask=valid, other=0).to(tl.int64)
        in_block = (offs % TPB).to(tl.int64)
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + block[:, None] * stride_kb + in_block[:, None] * stride_kt
                    + kv_head * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + block[:, None] * stride_vb + in_block[:, None] * stride_vt
                    + kv_head * stride_vh + d[None, :], mask=kv_mask, other=0.0)  # in flight with k
        if KV_FP8:  # the FP8 pool's values times their scale, rounded to q's dtype (as the reference)
            k = k.to(tl.float32) * tl.load(k_scale_ptr)
            v = v.to(tl.float32) * tl.load(v_scale_ptr)
        s = tl.dot(q, tl.trans(k.to(q.dtype)))  # [G_PAD, BLOCK_N] float32
        if HAS_SOFT_CAP:
            s = soft_cap * _tanh(s * (scale / soft_cap)) * 1.4426950408889634
        else:
            s = s * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    mask = g_mask[:, None] & d_mask[None, :]
    if not SPLIT:
        tl.store(out_ptr + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        row = (seq.to(tl.int64) * (tl.num_programs(1) * G) + heads) * num_splits + split  # [G_PAD]
        tl.store(part_out_ptr + row[:, None] * D + d[None, :], out, mask=mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_mask)


@triton.jit
def _merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, stride_ot, stride_oh, num_splits,
                         D: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row0 = (seq * tl.num_programs(1) + head) * num_splits
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    lse = tl.load(part_lse_ptr + row0 + s, mask=s < num_splits, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m > float("-inf"), m, 0.0)  # an empty sequence (context 0) gives zeros, not NaN
    w = tl.exp2(lse - m)
    live = lse > float("-inf")
    o = tl.load(part_out_ptr + (row0 + s)[:, None] * D + d[None, :], mask=live[:, None] & (d < D)[None, :], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def paged_layout(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int]:
    """Check q [..., Hq, D] against the paged caches [num_blocks, tokens_per_block, Hkv, D] (unit
    stride in D, Hq a multiple of Hkv) and return (tokens_per_block, Hkv)."""
    hq, dim = q.shape[-2], q.shape[-1]
    tpb, hkv = k_cache.shape[1], k_cache.shape[2]
    assert hq % hkv == 0 and k_cache.shape[3] == dim and v_cache.shape == k_cache.shape
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    return tpb, hkv


def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits_for(batch: int, kv_heads: int, max_context: int, block_n: int, num_sms: int) -> int:
    """Splits per (sequence, kv head): enough programs for ~4 per multiprocessor, no split shorter
    than one tile of the longest context the block table can hold, at most 64. Depends on shapes only."""
    wanted = triton.cdiv(4 * num_sms, max(batch * kv_heads, 1))
    return max(1, min(wanted, triton.cdiv(max_context, block_n), 64))


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, sliding_window: int | None = None, soft_cap: float | None = None,
    out: torch.Tensor | None = None, num_splits: int | None = None, block_n: int | None = None,
    num_warps: int = 4, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [B, Hq, D], one query per sequence at position context_lens[b] - 1 (its K/V already in the cache);
    k_cache, v_cache: [num_blocks, tokens_per_block, Hkv, D]; block_tables: [>= B, max_blocks] int32/int64;
    context_lens: [>= B] int32. Writes and returns out [B, Hq, D] (out may be a slice of a larger buffer).
    An FP8 pool (float8_e4m3fn caches) takes k_scale and v_scale (float32 [])."""
    batch, hq, dim = q.shape
    tpb, hkv = paged_layout(q, k_cache, v_cache)
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    group = hq // hkv
    d_pad = max(16, triton.next_power_of_2(dim))
    if num_splits is None:
        sms = _num_sms(q.device.index if q.device.index is not None else torch.cuda.current_device()) if q.is_cuda else 132
        num_splits = num_splits_for(batch, hkv, block_tables.shape[1] * tpb, 32, sms)
    if block_n is None:  # measured on the H200 (benchmarks/kernels.py sweep): short tiles when split
        block_n = 64 if num_splits == 1 and d_pad <= 128 else 32
    if num_splits > 1:
        part_out = torch.empty((batch, hq, num_splits, dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, hq, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    _decode_split_kernel[(batch, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse,
        k_scale if k_scale is not None else q, v_scale if v_scale is not None else q,
        scale, soft_cap or 0.0, sliding_window or 0, num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=group, G_PAD=max(16, triton.next_power_of_2(group)), D=dim, D_PAD=d_pad, TPB=tpb,
        BLOCK_N=block_n, SPLIT=num_splits > 1, HAS_SOFT_CAP=soft_cap is not None,
        HAS_WINDOW=sliding_window is not None, KV_FP8=k_scale is not None, num_warps=num_warps, num_stages=2,
    )
    if num_splits > 1:
        _merge_splits_kernel[(batch, hq)](
            part_out, part_lse, out, out.stride(0), out.stride(1), num_splits,
            D=dim, D_PAD=d_pad, SPLITS_PAD=max(16, triton.next_power_of_2(num_splits)), num_warps=4,
        )
    return out
