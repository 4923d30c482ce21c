"""Norms. `fused_add_rms_norm` and `rms_norm` (an RMS `norm` too: q/k norms, Gemma's and EXAONE's
output norms) run the Triton kernel (`triton.py`) on CUDA bf16/fp16 tensors, the reference
(`reference.py`) otherwise; LayerNorm is torch's."""

from __future__ import annotations

import torch

from trtc.formats.graph import NormConfig
from trtc.formats.quant_layout import quantize_fp8
from trtc.plugins.dispatch import use_triton
from trtc.plugins.norm import reference


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """x: [..., hidden] (last dim contiguous; rows may be strided, e.g. the q heads of a fused qkv
    output); weight: [hidden] -> rms_norm(x) * (weight + offset) [..., hidden]: one kernel launch on
    a GPU instead of the reference's eight small ops."""
    if use_triton(x, weight):
        from trtc.plugins.norm import triton as kernels

        return kernels.fused_add_rms_norm(x, None, weight, eps, offset)[0]
    return reference.rms_norm(x, weight, eps, offset)


def norm(x: torch.Tensor, cfg: NormConfig, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., hidden] -> the norm `cfg` names (RMS through `rms_norm`, LayerNorm through torch)."""
    if cfg.kind == "rms" and bias is None:
        return rms_norm(x, weight, cfg.eps, cfg.offset)
    return reference.norm(x, cfg, weight, bias)


__all__ = ["fused_add_rms_norm", "norm", "rms_norm"]
