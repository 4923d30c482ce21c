"""Norms. `fused_add_rms_norm` runs the Triton kernel (`triton.py`) on CUDA bf16/fp16 tensors and
the reference (`reference.py`) otherwise."""

from __future__ import annotations

import torch

from trtc.formats.quant_layout import quantize_fp8
from trtc.plugins.dispatch import use_triton
from trtc.plugins.norm import reference
from trtc.plugins.norm.reference import norm, rms_norm


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, offset: float = 0.0,
    out_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, hidden]; weight: [hidden]. Returns (normed, new_residual = x + residual);
    with residual None, (rms_norm(x), x). With out_scale (float32 []: the input scale of the FP8
    GEMM that follows), normed is fp8(normed / out_scale) in float8_e4m3fn."""
    if use_triton(x, weight) and (residual is None or residual.dtype == x.dtype):
        from trtc.plugins.norm import triton as kernels

        return kernels.fused_add_rms_norm(x, residual, weight, eps, offset, out_scale)
    normed, new_residual = reference.fused_add_rms_norm(x, residual, weight, eps, offset)
    return (normed if out_scale is None else quantize_fp8(normed, out_scale)), new_residual


__all__ = ["fused_add_rms_norm", "norm", "rms_norm"]
