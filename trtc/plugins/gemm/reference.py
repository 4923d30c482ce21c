"""The linear layer of the layer graph: y = x @ W^T + b, reading the layer's tensors by name.

A layer `name` owns `name.weight` [out, in] and optionally `name.bias` [out]. bf16/fp16/fp32
weights go to cuBLAS through torch (on a GPU) or to torch's CPU GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weights: dict[str, torch.Tensor], name: str, bias: bool = True) -> torch.Tensor:
    """x: [..., in] -> [..., out]. Row-parallel layers pass bias=False: their bias is added once,
    after the all-reduce of the partial results."""
    return F.linear(x, weights[name + ".weight"], weights.get(name + ".bias") if bias else None)
