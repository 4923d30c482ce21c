"""GEMM: every linear layer of the model goes through `linear`."""

from trtc.plugins.gemm.reference import linear

__all__ = ["linear"]
