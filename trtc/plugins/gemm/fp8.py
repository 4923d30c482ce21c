"""FP8 GEMM (W8A8, per-tensor scales) emulated in PyTorch: the reference of the FP8 kernels.

    y = (fp8(x / input_scale) @ weight^T) * (input_scale * weight_scale)

with float32 accumulation, as an FP8 tensor-core GEMM computes it (layout: trtc/quantization/layout.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trtc.quantization.layout import quantize_fp8


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: [..., in] (model dtype); weight: float8_e4m3fn [out, in]; scales: float32 [] -> [..., out]."""
    xq = quantize_fp8(x, input_scale)
    y = F.linear(xq.float(), weight.float()) * (input_scale * weight_scale)
    y = y.to(x.dtype)
    return y if bias is None else y + bias
