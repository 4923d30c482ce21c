"""Paged-KV prefill attention: variable-length causal flash attention over a cached prefix (Triton).

One launch covers every prefill sequence of the batch: grid (query heads, query tiles of the longest
chunk, sequences); a program whose tile lies past its sequence's chunk returns at once. The chunk of
sequence b holds query_start_loc[b+1] - query_start_loc[b] new tokens at the end of its context
(context_lens[b] tokens, the new ones already written to the cache), so prefix caching and chunked
prefill are the same case: query i sits at position context - query_len + i. Keys come through the
block table one BLOCK_N tile at a time; tiles wholly before the sliding window are skipped.
FLOPs = 4 * D * Hq * (query, key) pairs allowed; bytes ~ Q + O + K/V once per query tile and head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtc.plugins.attention.triton_decode import _tanh, paged_layout


@triton.jit
def _attend_tile(
    q, acc, l_i, m_i, n, pos, hi, bt_row, k_cache_ptr, v_cache_ptr, kv_head, d,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale, soft_cap, window, ks, vs,
    D: tl.constexpr, D_PAD: tl.constexpr, TPB: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, HAS_SOFT_CAP: tl.constexpr, HAS_WINDOW: tl.constexpr, KV_FP8: tl.constexpr,
):
    """One BLOCK_N tile of keys into the online softmax. MASKED=False: every key of the tile is
    allowed for every query row (a tile wholly below the diagonal, no window)."""
    offs = n + tl.arange(0, BLOCK_N)
    valid = offs < hi
    block = tl.load(bt_row + offs // TPB, mask=valid, other=0).to(tl.int64)
    in_block = (offs % TPB).to(tl.int64)
    k_ptrs = k_cache_ptr + block[:, None] * stride_kb + in_block[:, None] * stride_kt + kv_head * stride_kh + d[None, :]
    v_ptrs = v_cache_ptr + block[:, None] * stride_vb + in_block[:, None] * stride_vt + kv_head * stride_vh + d[None, :]
    if MASKED or D != D_PAD:
        kv_mask = valid[:, None] & (d < D)[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if KV_FP8:  # the FP8 pool's values times their scale, rounded to q's dtype (as the reference)
        k = k.to(tl.float32) * ks
        v = v.to(tl.float32) * vs
    s = tl.dot(q, tl.trans(k.to(q.dtype)))  # [BLOCK_M, BLOCK_N] float32
    if HAS_SOFT_CAP:
        s = soft_cap * _tanh(s * (scale / soft_cap)) * 1.4426950408889634
    else:
        s = s * (scale * 1.4426950408889634)
    if MASKED:
        allowed = valid[None, :] & (offs[None, :] <= pos[:, None])
        if HAS_WINDOW:
            allowed = allowed & (pos[:, None] - offs[None, :] < window)
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # a row with nothing allowed yet stays empty
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["first_seq", "window"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, context_lens_ptr, out_ptr,
    k_scale_ptr, v_scale_ptr, first_seq, scale, soft_cap, window,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    stride_ot, stride_oh,
    G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, TPB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SOFT_CAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    head = tl.program_id(0)  # heads vary fastest: programs launched together share the sequence's K/V in L2
    tile = tl.num_programs(1) - 1 - tl.program_id(1)  # the longest causal rows first
    seq = first_seq + tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    ctx = tl.load(context_lens_ptr + seq)
    prefix = ctx - q_len
    kv_head = head // G

    m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_PAD)
    m_mask = m < q_len
    d_mask = d < D
    pos = prefix + m  # [BLOCK_M] absolute positions of the queries
    tok = (q_start + m).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    first_pos = prefix + tile * BLOCK_M
    hi = tl.minimum(ctx, first_pos + BLOCK_M)  # past the last key any query of the tile sees
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    ks = 1.0
    vs = 1.0
    if KV_FP8:
        ks = tl.load(k_scale_ptr)
        vs = tl.load(v_scale_ptr)
    if HAS_WINDOW:  # every tile masked; tiles wholly before the window of the first query skipped
        lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
        for n in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _attend_tile(
                q, acc, l_i, m_i, n, pos, hi, bt_row, k_cache_ptr, v_cache_ptr, kv_head, d,
                stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale, soft_cap, window, ks, vs,
                D, D_PAD, TPB, BLOCK_N, True, HAS_SOFT_CAP, True, KV_FP8)
    else:  # keys below first_pos are seen by every query of the tile: no mask there
        full = first_pos // BLOCK_N * BLOCK_N
        for n in range(0, full, BLOCK_N):
            acc, l_i, m_i = _attend_tile(
                q, acc, l_i, m_i, n, pos, hi, bt_row, k_cache_ptr, v_cache_ptr, kv_head, d,
                stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale, soft_cap, window, ks, vs,
                D, D_PAD, TPB, BLOCK_N, False, HAS_SOFT_CAP, False, KV_FP8)
        for n in range(full, hi, BLOCK_N):
            acc, l_i, m_i = _attend_tile(
                q, acc, l_i, m_i, n, pos, hi, bt_row, k_cache_ptr, v_cache_ptr, kv_head, d,
                stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale, soft_cap, window, ks, vs,
                D, D_PAD, TPB, BLOCK_N, True, HAS_SOFT_CAP, False, KV_FP8)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def prefill_tiles(max_query_len: int, dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a launch. At Llama-8B shapes on the H200,
    64 x 64 with 4 warps beat 128-row tiles for 128- and 2048-token prompts alike (benchmarks/kernels.py)."""
    d_pad = max(16, triton.next_power_of_2(dim))
    block_m = min(64, max(16, triton.next_power_of_2(max_query_len)))
    return block_m, (64 if d_pad <= 128 else 32), 4, 2


def prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, context_lens: torch.Tensor, first_seq: int, num_seqs: int, max_query_len: int,
    scale: float, sliding_window: int | None = None, soft_cap: float | None = None,
    out: torch.Tensor | None = None, tiles: tuple[int, int, int, int] | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of sequences first_seq .. first_seq + num_seqs - 1 of the batch.

    q, out: [T, Hq, D] for the whole batch (token rows located by query_start_loc [B+1] int32);
    k_cache, v_cache: [num_blocks, tokens_per_block, Hkv, D]; block_tables: [B, max_blocks];
    context_lens: [B] int32; max_query_len: the longest chunk among those sequences (host int).
    An FP8 pool (float8_e4m3fn caches) takes k_scale and v_scale (float32 [])."""
    _, hq, dim = q.shape
    tpb, hkv = paged_layout(q, k_cache, v_cache)
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0 or max_query_len == 0:
        return out
    block_m, block_n, warps, stages = tiles or prefill_tiles(max_query_len, dim)
    grid = (hq, triton.cdiv(max_query_len, block_m), num_seqs)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, out,
        k_scale if k_scale is not None else q, v_scale if v_scale is not None else q, first_seq, scale, soft_cap or 0.0, sliding_window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=hq // hkv, D=dim, D_PAD=max(16, triton.next_power_of_2(dim)), TPB=tpb,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_SOFT_CAP=soft_cap is not None,
        HAS_WINDOW=sliding_window is not None, KV_FP8=k_scale is not None, num_warps=warps, num_stages=stages,
    )
    return out
