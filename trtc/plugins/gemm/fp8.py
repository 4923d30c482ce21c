"""FP8 GEMM (W8A8, per-tensor scales) emulated in PyTorch: the reference of the FP8 kernels.

    y = (fp8(x / input_scale) @ weight^T) * (input_scale * weight_scale)

with float32 accumulation, as an FP8 tensor-core GEMM computes it (layout: trtc/formats/quant_layout.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trtc.formats.quant_layout import FP8, quantize_fp8


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor,
    bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x: [..., in] (model dtype, or float8_e4m3fn already quantized with input_scale); weight:
    float8_e4m3fn [out, in]; input_scale: float32 []; weight_scale: float32 [] or [out] -> [..., out]
    in out_dtype (default x's dtype)."""
    xq = x if x.dtype == FP8 else quantize_fp8(x, input_scale)
    y = F.linear(xq.float(), weight.float()) * (input_scale * weight_scale)
    y = y.to(out_dtype or x.dtype)
    return y if bias is None else y + bias
