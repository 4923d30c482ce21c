"""W4A16 GEMM (INT4 weights in groups, activations in the model dtype) in PyTorch: the reference
of the groupwise kernels for AWQ and GPTQ (layout: trtc/formats/quant_layout.py).

    x' = (x * pre_quant_scale)[..., input_perm]      each factor only if the layer has it
    w[o, c] = (u[o, c] - zero[o, c // group]) * scale[o, c // group]     zero 8 when symmetric
    y = x' @ w^T        (w in the model dtype)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trtc.formats.quant_layout import unpack_int4

SYMMETRIC_ZERO = 8


def dequantize_int4(
    weight: torch.Tensor, weight_scale: torch.Tensor, weight_zero: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """weight: uint8 [out, in/2]; weight_scale, weight_zero: [out, in/group] -> [out, in] in `dtype`."""
    u = unpack_int4(weight).float()  # [out, in]
    group = u.shape[1] // weight_scale.shape[1]
    zero = SYMMETRIC_ZERO if weight_zero is None else weight_zero.float().repeat_interleave(group, dim=1)
    return ((u - zero) * weight_scale.float().repeat_interleave(group, dim=1)).to(dtype)


def w4a16_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero: torch.Tensor | None = None,
    pre_quant_scale: torch.Tensor | None = None,
    input_perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: [..., in] -> [..., out] in x's dtype."""
    x = w4a16_input(x, pre_quant_scale, input_perm)
    return F.linear(x, dequantize_int4(weight, weight_scale, weight_zero, x.dtype), bias)


def w4a16_input(x: torch.Tensor, pre_quant_scale: torch.Tensor | None, input_perm: torch.Tensor | None) -> torch.Tensor:
    """x' = (x * pre_quant_scale)[..., input_perm], each factor only if the layer has it."""
    if pre_quant_scale is not None:
        x = x * pre_quant_scale.to(x.dtype)
    if input_perm is not None:
        x = x[..., input_perm.long()]
    return x
