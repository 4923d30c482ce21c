"""Fused SwiGLU: silu(gate) * up from the fused gate_up projection, in one pass (Triton).

Precision as the reference `F.silu(gate) * up` in the activation dtype: silu in float32 rounded
to the dtype, then the product in float32 rounded to the dtype.
bytes = T * I * itemsize * (2 reads + 1 write).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtc.plugins.fp8_triton import fp8_saturate


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, out_scale_ptr, stride_in, stride_out, inter, QUANT: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_in + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    y = (act * up.to(tl.float32)).to(gate.dtype)
    if QUANT:  # fp8(y / scale), the input of an FP8 GEMM
        y = fp8_saturate(y, tl.load(out_scale_ptr))
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up: [T, 2I] (gate first, then up; last dim contiguous) -> [T, I]; float8_e4m3fn
    fp8(y / out_scale) with out_scale (float32 [])."""
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    lead, inter = gate_up.shape[:-1], gate_up.shape[-1] // 2
    x = gate_up.reshape(-1, 2 * inter)
    dtype = gate_up.dtype if out_scale is None else torch.float8_e4m3fn
    out = torch.empty((x.shape[0], inter), dtype=dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inter))
    if x.shape[0] > 0:
        _silu_and_mul_kernel[(x.shape[0], triton.cdiv(inter, block))](
            x, out, out_scale if out_scale is not None else x, x.stride(0), out.stride(0), inter,
            QUANT=out_scale is not None, BLOCK=block, num_warps=4
        )
    return out.view(*lead, inter)
