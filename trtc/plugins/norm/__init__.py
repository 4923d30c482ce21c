"""Norms. `fused_add_rms_norm` runs the Triton kernel (`triton.py`) on CUDA bf16/fp16 tensors and
the reference (`reference.py`) otherwise."""

from __future__ import annotations

import torch

from trtc.plugins.dispatch import use_triton
from trtc.plugins.norm import reference
from trtc.plugins.norm.reference import norm, rms_norm


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, hidden]; weight: [hidden]. Returns (normed, new_residual = x + residual);
    with residual None, (rms_norm(x), x)."""
    if use_triton(x, weight) and (residual is None or residual.dtype == x.dtype):
        from trtc.plugins.norm import triton as kernels

        return kernels.fused_add_rms_norm(x, residual, weight, eps, offset)
    return reference.fused_add_rms_norm(x, residual, weight, eps, offset)


__all__ = ["fused_add_rms_norm", "norm", "rms_norm"]
