"""GEMM: every linear layer of the model goes through `linear` (linear.py)."""

from trtc.plugins.gemm.linear import linear

__all__ = ["linear"]
