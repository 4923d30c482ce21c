"""RoPE (rotate-half) on q and k fused with the write of k and v into the paged KV cache (Triton).

One program per token: it reads the token's cos/sin row from the tables at its position, rotates
all its q and k heads in float32 (one rounding at the end), writes rotated q and k out, and writes
rotated k and v into the cache slot of the token (slot = block * tokens_per_block + offset).
Any RoPE kind whose cos/sin tables the runner builds goes through here; tables narrower than the
head (partial rotary) rotate its first dims and copy the rest.
bytes = T * (Hq + 2 Hkv) * D * itemsize read + T * (Hq + 3 Hkv) * D written (+ 2 cos/sin rows per token).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtc.plugins.fp8_triton import fp8_saturate


@triton.jit
def _rotate_heads(x_ptr, stride_xh, out_ptr, stride_oh, cos1, sin1, cos2, sin2, n_heads,
                  H_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """Rotates [n_heads, 2 * HALF] at x_ptr (rows stride_xh apart), stores at out_ptr; returns both halves."""
    h = tl.arange(0, H_PAD)[:, None]
    d = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < n_heads) & (d < HALF)
    x1 = tl.load(x_ptr + h * stride_xh + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + h * stride_xh + HALF + d, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos1 - x2 * sin1
    o2 = x2 * cos2 + x1 * sin2
    tl.store(out_ptr + h * stride_oh + d, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + h * stride_oh + HALF + d, o2.to(out_ptr.dtype.element_ty), mask=mask)
    return o1, o2, mask


@triton.jit
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr,
    k_scale_ptr, v_scale_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
    stride_qot, stride_qoh, stride_kot, stride_koh, stride_cslot, stride_ch, stride_vslot, stride_vch,
    n_q_heads, n_kv_heads,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, HQ_PAD: tl.constexpr, HKV_PAD: tl.constexpr, KV_FP8: tl.constexpr,
    PASS: tl.constexpr, PASS_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF_PAD)[None, :]
    dm = d < HALF
    cos1 = tl.load(cos_ptr + pos * stride_cos + d, mask=dm, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + pos * stride_cos + HALF + d, mask=dm, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + pos * stride_sin + d, mask=dm, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + pos * stride_sin + HALF + d, mask=dm, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, q_out_ptr + t * stride_qot, stride_qoh,
                  cos1, sin1, cos2, sin2, n_q_heads, HQ_PAD, HALF, HALF_PAD)
    k1, k2, kmask = _rotate_heads(k_ptr + t * stride_kt, stride_kh, k_out_ptr + t * stride_kot, stride_koh,
                                  cos1, sin1, cos2, sin2, n_kv_heads, HKV_PAD, HALF, HALF_PAD)
    h = tl.arange(0, HKV_PAD)[:, None]
    kc = k_cache_ptr + slot * stride_cslot + h * stride_ch + d
    # the cache holds what the returned k holds: the rotation rounded to the activation dtype first
    k1 = k1.to(k_out_ptr.dtype.element_ty)
    k2 = k2.to(k_out_ptr.dtype.element_ty)
    v1 = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=kmask)
    v2 = tl.load(v_ptr + t * stride_vt + h * stride_vh + HALF + d, mask=kmask)
    if KV_FP8:  # an FP8 pool holds fp8(k / k_scale), fp8(v / v_scale)
        ks = tl.load(k_scale_ptr)
        vs = tl.load(v_scale_ptr)
        k1 = fp8_saturate(k1, ks)
        k2 = fp8_saturate(k2, ks)
        v1 = fp8_saturate(v1, vs)
        v2 = fp8_saturate(v2, vs)
    tl.store(kc, k1.to(k_cache_ptr.dtype.element_ty), mask=kmask)
    tl.store(kc + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=kmask)
    vc = v_cache_ptr + slot * stride_vslot + h * stride_vch + d
    tl.store(vc, v1.to(v_cache_ptr.dtype.element_ty), mask=kmask)
    tl.store(vc + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=kmask)
    if PASS > 0:  # partial rotary: dims [2 HALF, 2 HALF + PASS) of every head are copied as they are
        e = 2 * HALF + tl.arange(0, PASS_PAD)[None, :]
        em = e < 2 * HALF + PASS
        hq = tl.arange(0, HQ_PAD)[:, None]
        qm = (hq < n_q_heads) & em
        xq = tl.load(q_ptr + t * stride_qt + hq * stride_qh + e, mask=qm)
        tl.store(q_out_ptr + t * stride_qot + hq * stride_qoh + e, xq.to(q_out_ptr.dtype.element_ty), mask=qm)
        km = (h < n_kv_heads) & em
        xk = tl.load(k_ptr + t * stride_kt + h * stride_kh + e, mask=km).to(k_out_ptr.dtype.element_ty)
        tl.store(k_out_ptr + t * stride_kot + h * stride_koh + e, xk, mask=km)
        xv = tl.load(v_ptr + t * stride_vt + h * stride_vh + e, mask=km)
        if KV_FP8:
            xk = fp8_saturate(xk, tl.load(k_scale_ptr))
            xv = fp8_saturate(xv, tl.load(v_scale_ptr))
        tl.store(k_cache_ptr + slot * stride_cslot + h * stride_ch + e, xk.to(k_cache_ptr.dtype.element_ty), mask=km)
        tl.store(v_cache_ptr + slot * stride_vslot + h * stride_vch + e, xv.to(v_cache_ptr.dtype.element_ty), mask=km)


def rope_and_write_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] (strided views of the fused qkv are fine, last dim contiguous);
    cos, sin: [max_seq_len, R] tables indexed by positions [T] (R < D: partial rotary, dims past R pass
    through); k_cache, v_cache:
    [num_blocks, tokens_per_block, Hkv, D] written at slot_mapping [T]. Returns (q_rot, k_rot), written into
q_out [T, Hq, D] and k_out [T, Hkv, D] when given (last dim contiguous). An FP8 pool
    (float8_e4m3fn caches) takes k_scale and v_scale (float32 [])."""
    t, hq, dim = q.shape
    hkv = k.shape[1]
    assert dim % 2 == 0 and k.shape == v.shape == (t, hkv, dim), (q.shape, k.shape, v.shape)
    assert k_cache.shape[2:] == (hkv, dim) and v_cache.shape == k_cache.shape, k_cache.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "slot addressing needs contiguous caches"
    assert (k_scale is not None) == (k_cache.dtype == torch.float8_e4m3fn), "an FP8 pool needs its scales"
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    cos, sin = (x if x.stride(-1) == 1 else x.contiguous() for x in (cos, sin))
    q_out = torch.empty((t, hq, dim), dtype=q.dtype, device=q.device) if q_out is None else q_out
    k_out = torch.empty((t, hkv, dim), dtype=k.dtype, device=k.device) if k_out is None else k_out
    if t == 0:
        return q_out, k_out
    rot = cos.shape[-1]
    assert rot % 2 == 0 and rot <= dim and sin.shape[-1] == rot, (cos.shape, dim)
    half = rot // 2
    _rope_write_kv_kernel[(t,)](
        q, k, v, cos, sin, positions, slot_mapping, q_out, k_out, k_cache, v_cache,
        k_scale if k_scale is not None else cos, v_scale if v_scale is not None else cos,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        hq, hkv,
        HALF=half, HALF_PAD=triton.next_power_of_2(half),
        HQ_PAD=triton.next_power_of_2(hq), HKV_PAD=triton.next_power_of_2(hkv), KV_FP8=k_scale is not None,
        PASS=dim - rot, PASS_PAD=triton.next_power_of_2(max(dim - rot, 1)), num_warps=4,
    )
    return q_out, k_out
