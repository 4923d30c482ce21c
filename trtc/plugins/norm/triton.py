"""Fused residual add + RMSNorm in one pass over the row (Triton).

HF precision semantics, as `reference.rms_norm` after `x + residual`:
    new_residual = (x + residual) rounded to x's dtype           (HF adds in the activation dtype)
    normed = weight * (new_residual.float() * rsqrt(mean(new_residual.float()^2) + eps)).to(dtype)
One program per row; the row stays in registers, so each element is read once and written once:
bytes = T * hidden * itemsize * (2 reads + 2 writes) with a residual, (1 + 1) without.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtc.plugins.fp8_triton import fp8_saturate


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, out_scale_ptr,
    stride_x, stride_res, stride_out, stride_new_res,
    n_cols, eps, offset,
    HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(new_res_ptr + row * stride_new_res + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    y = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    if HAS_OFFSET:  # Gemma-style (1 + weight), added in the weight's dtype as the reference does
        w = (w.to(tl.float32) + offset).to(w.dtype)
    normed = (w.to(tl.float32) * y).to(x.dtype)
    if QUANT:  # fp8(normed / scale), the input of an FP8 GEMM
        normed = fp8_saturate(normed, tl.load(out_scale_ptr))
    tl.store(out_ptr + row * stride_out + cols, normed.to(out_ptr.dtype.element_ty), mask=mask)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, offset: float = 0.0,
    out_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, hidden] (any leading dims; last dim contiguous); weight: [hidden].
    Returns (normed, new_residual); new_residual = x + residual, or x itself when residual is None.
    With out_scale (float32 []), normed is float8_e4m3fn: fp8(normed / out_scale)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n_rows, n_cols = x2.shape
    out = torch.empty((n_rows, n_cols), dtype=x.dtype if out_scale is None else torch.float8_e4m3fn, device=x.device)
    if residual is None:
        r2 = new_res = x2
    else:
        r2 = residual.reshape(-1, n_cols)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        new_res = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(n_cols)
    if n_rows > 0:
        _add_rms_norm_kernel[(n_rows,)](
            x2, r2, weight, out, new_res, out_scale if out_scale is not None else weight,
            x2.stride(0), r2.stride(0), out.stride(0), new_res.stride(0),
            n_cols, eps, offset,
            HAS_RESIDUAL=residual is not None, HAS_OFFSET=offset != 0.0, QUANT=out_scale is not None, BLOCK=block,
            num_warps=min(max(block // 512, 1), 16),
        )
    return out.view(shape), (x if residual is None else new_res.view(shape))
