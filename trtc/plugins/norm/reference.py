"""RMSNorm and LayerNorm, computed in float32 and cast back (as HF transformers does)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trtc.formats.graph import NormConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    # x: [..., hidden], weight: [hidden]
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    w = weight + offset if offset else weight
    return w * y.to(x.dtype)


def norm(x: torch.Tensor, cfg: NormConfig, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if cfg.kind == "rms":
        return rms_norm(x, weight, cfg.eps, cfg.offset)
    w = weight + cfg.offset if cfg.offset else weight
    return F.layer_norm(x.float(), (x.shape[-1],), w.float(), None if bias is None else bias.float(), cfg.eps).to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the add in x's dtype as HF does; residual None: (rms_norm(x), x)."""
    h = x if residual is None else x + residual
    return rms_norm(h, weight, eps, offset), h
