"""MLP activations. `silu_and_mul` (SwiGLU over the fused gate_up output) runs the Triton kernel
(`triton.py`) on CUDA bf16/fp16 tensors and the reference (`reference.py`) otherwise."""

from __future__ import annotations

import torch

from trtc.formats.quant_layout import quantize_fp8
from trtc.plugins.activation import reference
from trtc.plugins.activation.reference import ACTIVATION_FNS, gated_activation
from trtc.plugins.dispatch import use_triton


def silu_and_mul(gate_up: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up: [T, 2I], gate first then up -> silu(gate) * up: [T, I]; with out_scale (float32 []:
    the input scale of the FP8 GEMM that follows), fp8(y / out_scale) in float8_e4m3fn."""
    if use_triton(gate_up):
        from trtc.plugins.activation import triton as kernels

        return kernels.silu_and_mul(gate_up, out_scale)
    y = reference.silu_and_mul(gate_up)
    return y if out_scale is None else quantize_fp8(y, out_scale)


def act_and_mul(gate_up: torch.Tensor, activation: str, out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up: [T, 2I] -> act(gate) * up [T, I] for any graph activation; the fused kernel for silu
    and gelu_tanh on CUDA bf16/fp16 tensors. out_scale as in silu_and_mul."""
    if use_triton(gate_up):
        from trtc.plugins.activation import triton as kernels

        if activation in kernels.GATED_ACTIVATIONS:
            return kernels.act_and_mul(gate_up, activation, out_scale)
    y = gated_activation(*gate_up.chunk(2, dim=-1), activation)
    return y if out_scale is None else quantize_fp8(y, out_scale)


__all__ = ["ACTIVATION_FNS", "act_and_mul", "gated_activation", "silu_and_mul"]
