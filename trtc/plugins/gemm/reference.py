"""The linear layer of the layer graph: y = x @ W^T + b, reading the layer's tensors by name.

A layer `name` owns `name.weight` [out, in] and optionally `name.bias` [out]. bf16/fp16/fp32
weights go to cuBLAS through torch (on a GPU) or to torch's CPU GEMM. A quantized layer
(trtc/quantization/layout.py) is recognised by its tensors: `name.input_scale` means FP8
(plugins/gemm/fp8.py), `name.weight_scale` without it means INT4 weight-only (plugins/gemm/w4a16.py).
So the forwards that call `linear` know nothing of quantization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trtc.plugins.gemm.fp8 import fp8_linear
from trtc.plugins.gemm.w4a16 import w4a16_linear


def linear(x: torch.Tensor, weights: dict[str, torch.Tensor], name: str, bias: bool = True) -> torch.Tensor:
    """x: [..., in] -> [..., out]. Row-parallel layers pass bias=False: their bias is added once,
    after the all-reduce of the partial results."""
    b = weights.get(name + ".bias") if bias else None
    scale = weights.get(name + ".weight_scale")
    if scale is None:
        return F.linear(x, weights[name + ".weight"], b)
    if name + ".input_scale" in weights:
        return fp8_linear(x, weights[name + ".weight"], scale, weights[name + ".input_scale"], b)
    return w4a16_linear(
        x, weights[name + ".weight"], scale, weights.get(name + ".weight_zero"),
        weights.get(name + ".pre_quant_scale"), weights.get(name + ".input_perm"), b,
    )
