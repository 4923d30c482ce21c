"""The linear layer of the layer graph: y = x @ W^T + b, reading the layer's tensors by name.

A layer `name` owns `name.weight` [out, in] and optionally `name.bias` [out]. bf16/fp16/fp32
weights go to cuBLAS through torch (on a GPU) or to torch's CPU GEMM. A quantized layer
(trtc/formats/quant_layout.py) is recognised by its tensors: `name.input_scale` means FP8 W8A8,
`name.weight_scale` without it means INT4 weight-only (W4A16). So the forwards that call `linear`
know nothing of quantization. On CUDA the quantized GEMMs run the tactic the build chose for
their shape (tactics.py, the engine's TacticTable passed in by its model runner): trtc's CUDA C++ W4A16 kernel for decode-sized M (w4a16_packed.py), its
Triton kernels (triton_quant.py; for INT4 at large M the tensor-core GEMM or dequantize + cuBLAS of
w4a16_tc.py) or, for FP8, cuBLASLt through `torch._scaled_mm`; elsewhere the PyTorch references
(fp8.py, w4a16.py).

FP8 activations may arrive already quantized (float8_e4m3fn x, by the norm or activation kernel
before the GEMM, with this layer's input_scale); the output is then in `out_dtype`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trtc.formats.quant_layout import FP8
from trtc.plugins.dispatch import triton_available
from trtc.plugins.gemm.fp8 import fp8_linear
from trtc.plugins.gemm.tactics import Tactic, TacticTable, default_tactic, gemm_key
from trtc.plugins.gemm.w4a16 import w4a16_linear
from trtc.plugins.gemm.w4a16_packed import MAX_M, PACKED_TENSORS

QUANT_TENSORS = ("weight", "weight_scale", "input_scale", "weight_zero", "pre_quant_scale", "input_perm", *PACKED_TENSORS)
DEQUANT_MM = Tactic("dequant_mm")


def linear(
    x: torch.Tensor, weights: dict[str, torch.Tensor], name: str, bias: bool = True,
    out_dtype: torch.dtype | None = None, tactics: TacticTable | None = None,
) -> torch.Tensor:
    """x: [..., in] -> [..., out]. Row-parallel layers pass bias=False: their bias is added once,
    after the all-reduce of the partial results. out_dtype: the output dtype when x is FP8.
    tactics: the engine's tuned GEMM tactics (None: the defaults)."""
    b = weights.get(name + ".bias") if bias else None
    if name + ".weight_scale" not in weights:
        weight = weights[name + ".weight"]
        if weight.dtype != x.dtype:  # bf16 weights under float32 activations (a CPU with native bf16 GEMMs)
            return F.linear(x.to(weight.dtype), weight, b).to(x.dtype)
        return F.linear(x, weight, b)
    w = {t: weights[f"{name}.{t}"] for t in QUANT_TENSORS if f"{name}.{t}" in weights}
    out_dtype = out_dtype or x.dtype
    if x.is_cuda and triton_available() and out_dtype in (torch.bfloat16, torch.float16):
        return _quantized_cuda(x, w, b, out_dtype, tactics)
    if "input_scale" in w:
        return fp8_linear(x, w["weight"], w["weight_scale"], w["input_scale"], b, out_dtype)
    return run_tactic(DEQUANT_MM, x, w, out_dtype, b)


def _quantized_cuda(x: torch.Tensor, w: dict[str, torch.Tensor], bias: torch.Tensor | None,
                    out_dtype: torch.dtype, tactics: TacticTable | None) -> torch.Tensor:
    from trtc.plugins.gemm.act_quant import quantize_activation

    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if "input_scale" in w and x2.dtype != FP8:
        x2 = quantize_activation(x2, w["input_scale"])
    m, key = x2.shape[0], gemm_key(w["weight"], w["weight_scale"])
    tactic = tactics.choose(key, m) if tactics is not None else default_tactic(key, m)
    if tactic.impl == "cuda" and ("packed_weight" not in w or m > MAX_M):  # no NVRTC here, or M past the kernel
        tactic = default_tactic(key, m, packed=False)
    y = run_tactic(tactic, x2, w, out_dtype, bias)
    return y.view(*lead, y.shape[-1])


def run_tactic(tactic: Tactic, x: torch.Tensor, w: dict[str, torch.Tensor], out_dtype: torch.dtype,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """A quantized layer's GEMM by one tactic. x: [M, K] (an FP8 layer's already quantized with its
    input_scale); w: the layer's tensors by their QUANT_TENSORS names. -> [M, N] out_dtype."""
    if tactic.impl == "scaled_mm":
        return scaled_mm(x, w["weight"], w["input_scale"], w["weight_scale"], bias, out_dtype)
    if tactic.impl == "cuda":  # INT4, packed at load (w4a16_packed.py)
        from trtc.plugins.gemm import w4a16_packed

        return w4a16_packed.gemm(x, w, bias, features_per_block=tactic.block_n)
    int4 = (w["weight"], w["weight_scale"], w.get("weight_zero"), w.get("pre_quant_scale"), w.get("input_perm"), bias)
    if tactic.impl == "dequant_mm" and not (x.is_cuda and triton_available()):  # INT4: the PyTorch reference
        return w4a16_linear(x, *int4)
    if tactic.impl in ("dequant_mm", "triton_tc"):  # INT4, large M: w4a16_tc.py
        from trtc.plugins.gemm import w4a16_tc

        if tactic.impl == "dequant_mm":
            return w4a16_tc.dequant_mm(x, *int4)
        return w4a16_tc.gemm(x, *int4, **tactic.launch_args())
    from trtc.plugins.gemm import triton_quant

    return triton_quant.launch(
        x, w["weight"], w["weight_scale"], out_dtype=out_dtype, weight_zero=w.get("weight_zero"),
        pre_quant_scale=w.get("pre_quant_scale"), input_perm=w.get("input_perm"), input_scale=w.get("input_scale"),
        bias=bias, **tactic.launch_args(),
    )


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
