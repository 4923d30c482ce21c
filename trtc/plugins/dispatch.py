"""The one rule by which an op picks its implementation: the Triton kernel for CUDA tensors of a
dtype it supports when Triton imports, the PyTorch reference otherwise (CPU, other dtypes)."""

from __future__ import annotations

import functools

import torch

KERNEL_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    return all(t.is_cuda and t.dtype in KERNEL_DTYPES for t in tensors) and triton_available()
