"""Fused gated activations: act(gate) * up from the fused gate_up projection, in one pass (Triton):
SwiGLU (silu) and GeGLU (gelu_tanh, Gemma's gelu_pytorch_tanh).

Precision as the reference `act(gate) * up` in the activation dtype: the activation in float32
rounded to the dtype, then the product in float32 rounded to the dtype.
bytes = T * I * itemsize * (2 reads + 1 write).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtc.plugins.fp8_triton import fp8_saturate


@triton.jit
def _act_and_mul_kernel(gate_up_ptr, out_ptr, out_scale_ptr, stride_in, stride_out, inter, QUANT: tl.constexpr,
                        GELU_TANH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_in + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    if GELU_TANH:  # 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))), tanh(z) = 2 / (1 + exp(-2 z)) - 1
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        act = (0.5 * g * (2.0 / (1.0 + tl.exp(-2.0 * z)))).to(gate.dtype).to(tl.float32)
    else:
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    y = (act * up.to(tl.float32)).to(gate.dtype)
    if QUANT:  # fp8(y / scale), the input of an FP8 GEMM
        y = fp8_saturate(y, tl.load(out_scale_ptr))
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


GATED_ACTIVATIONS = ("silu", "gelu_tanh")


def silu_and_mul(gate_up: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
    return act_and_mul(gate_up, "silu", out_scale)


def act_and_mul(gate_up: torch.Tensor, activation: str, out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up: [T, 2I] (gate first, then up; last dim contiguous) -> act(gate) * up [T, I], act one of
    GATED_ACTIVATIONS; float8_e4m3fn fp8(y / out_scale) with out_scale (float32 [])."""
    assert activation in GATED_ACTIVATIONS, activation
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    lead, inter = gate_up.shape[:-1], gate_up.shape[-1] // 2
    x = gate_up.reshape(-1, 2 * inter)
    dtype = gate_up.dtype if out_scale is None else torch.float8_e4m3fn
    out = torch.empty((x.shape[0], inter), dtype=dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inter))
    if x.shape[0] > 0:
        _act_and_mul_kernel[(x.shape[0], triton.cdiv(inter, block))](
            x, out, out_scale if out_scale is not None else x, x.stride(0), out.stride(0), inter,
            QUANT=out_scale is not None, GELU_TANH=activation == "gelu_tanh", BLOCK=block, num_warps=4
        )
    return out.view(*lead, inter)
