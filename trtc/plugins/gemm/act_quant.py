"""Static FP8 quantization of activations: fp8(x / input_scale) with the calibrated scale, before an
FP8 GEMM whose input no norm or activation kernel quantized already (the attention output before o).
Triton; its reference is `quantize_fp8` (trtc/formats/quant_layout.py). bytes = T * K * (2 + 1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtc.formats.quant_layout import FP8
from trtc.plugins.fp8_triton import fp8_saturate


@triton.jit
def _quantize_fp8_kernel(x_ptr, scale_ptr, out_ptr, stride_x, stride_out, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    q = fp8_saturate(x, tl.load(scale_ptr))
    tl.store(out_ptr + row * stride_out + cols, q.to(out_ptr.dtype.element_ty), mask=mask)


def quantize_activation(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [T, K] (last dim contiguous); scale: float32 [] on x's device -> float8_e4m3fn [T, K]."""
    out = torch.empty(x.shape, dtype=FP8, device=x.device)
    block = min(2048, triton.next_power_of_2(x.shape[-1]))
    if x.shape[0]:
        _quantize_fp8_kernel[(x.shape[0], triton.cdiv(x.shape[-1], block))](
            x, scale, out, x.stride(0), out.stride(0), x.shape[-1], BLOCK=block, num_warps=4
        )
    return out
