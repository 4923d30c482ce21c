"""The linear layer of the layer graph: y = x @ W^T + b, reading the layer's tensors by name.

A layer `name` owns `name.weight` [out, in] and optionally `name.bias` [out]. bf16/fp16/fp32
weights go to cuBLAS through torch (on a GPU) or to torch's CPU GEMM. A quantized layer
(trtc/quantization/layout.py) is recognised by its tensors: `name.input_scale` means FP8 W8A8,
`name.weight_scale` without it means INT4 weight-only (W4A16). So the forwards that call `linear`
know nothing of quantization. On CUDA the quantized GEMMs run the tactic the build chose for
their shape (tactics.py): trtc's Triton kernels (triton_quant.py) or, for FP8, cuBLASLt through
`torch._scaled_mm`; elsewhere the PyTorch references (fp8.py, w4a16.py).

FP8 activations may arrive already quantized (float8_e4m3fn x, by the norm or activation kernel
before the GEMM, with this layer's input_scale); the output is then in `out_dtype`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trtc.plugins.dispatch import triton_available
from trtc.plugins.gemm.fp8 import fp8_linear
from trtc.plugins.gemm.tactics import TACTICS, gemm_key
from trtc.plugins.gemm.w4a16 import w4a16_linear
from trtc.quantization.layout import FP8


def linear(
    x: torch.Tensor, weights: dict[str, torch.Tensor], name: str, bias: bool = True,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x: [..., in] -> [..., out]. Row-parallel layers pass bias=False: their bias is added once,
    after the all-reduce of the partial results. out_dtype: the output dtype when x is FP8."""
    b = weights.get(name + ".bias") if bias else None
    scale = weights.get(name + ".weight_scale")
    if scale is None:
        return F.linear(x, weights[name + ".weight"], b)
    weight = weights[name + ".weight"]
    out_dtype = out_dtype or x.dtype
    fp8 = name + ".input_scale" in weights
    if x.is_cuda and triton_available() and out_dtype in (torch.bfloat16, torch.float16):
        return _quantized_cuda(x, weights, name, weight, scale, b, out_dtype, fp8)
    if fp8:
        return fp8_linear(x, weight, scale, weights[name + ".input_scale"], b, out_dtype)
    return w4a16_linear(
        x, weight, scale, weights.get(name + ".weight_zero"), weights.get(name + ".pre_quant_scale"),
        weights.get(name + ".input_perm"), b,
    )


def _quantized_cuda(x, weights, name, weight, scale, bias, out_dtype, fp8) -> torch.Tensor:
    from trtc.plugins.gemm import triton_quant
    from trtc.plugins.gemm.act_quant import quantize_activation

    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    tactic = TACTICS.choose(gemm_key(weight, scale), x2.shape[0])
    if fp8:
        input_scale = weights[name + ".input_scale"]
        if x2.dtype != FP8:
            x2 = quantize_activation(x2, input_scale)
        if tactic.impl == "scaled_mm":
            y = scaled_mm(x2, weight, input_scale, scale, bias, out_dtype)
        else:
            y = triton_quant.launch(x2, weight, scale, out_dtype=out_dtype, input_scale=input_scale, bias=bias,
                                    **tactic.launch_args())
    elif tactic.impl == "dequant_mm":
        y = w4a16_linear(x2, weight, scale, weights.get(name + ".weight_zero"), weights.get(name + ".pre_quant_scale"),
                         weights.get(name + ".input_perm"), bias)
    else:
        y = triton_quant.launch(
            x2, weight, scale, out_dtype=out_dtype, weight_zero=weights.get(name + ".weight_zero"),
            pre_quant_scale=weights.get(name + ".pre_quant_scale"), input_perm=weights.get(name + ".input_perm"),
            bias=bias, **tactic.launch_args(),
        )
    return y.view(*lead, y.shape[-1])


def scaled_mm(
    xq: torch.Tensor, weight: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """cuBLASLt FP8 GEMM: xq float8 [M, K] @ weight float8 [N, K]^T with per-tensor scales, or with the
    per-output-channel weight scales [N] of a fused layer (row-wise scaling). -> [M, N] out_dtype."""
    if weight_scale.dim() == 0:
        return torch._scaled_mm(xq, weight.t(), scale_a=input_scale, scale_b=weight_scale, bias=bias,
                                out_dtype=out_dtype)
    m = xq.shape[0]
    y = torch._scaled_mm(xq, weight.t(), scale_a=input_scale.expand(m, 1).contiguous(),
                         scale_b=weight_scale.view(1, -1), out_dtype=out_dtype)
    return y if bias is None else y + bias
