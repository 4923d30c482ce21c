"""The mixture-of-experts MLP in plain PyTorch: routing, then a loop over the experts that tokens
chose, each a gated MLP through the GEMM plugin (so FP8 experts compute as quant_layout.py says)."""

from __future__ import annotations

import torch

from trtc.plugins.activation.reference import gated_activation
from trtc.plugins.gemm import linear


def route(router_logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E] -> (weights [T, top_k] float32, expert ids [T, top_k] int64): softmax over
    the experts in float32, the top_k largest, renormalised to sum 1 when `normalize`."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def expert_tensors(experts: dict[str, torch.Tensor], e: int) -> dict[str, torch.Tensor]:
    """Expert e's slice of every stacked tensor: `gate_up.weight` [E, 2I, H] -> [2I, H], ... Scales
    are copied out of the stack: cuBLASLt's FP8 GEMM takes its scale pointers aligned, not at e * 4 bytes."""
    return {name: t[e] if t.dim() > 2 else t[e].clone() for name, t in experts.items()}


def fused_moe(x: torch.Tensor, experts: dict[str, torch.Tensor], weights: torch.Tensor, ids: torch.Tensor,
              activation: str = "silu") -> torch.Tensor:
    """x: [T, H]; experts: `gate_up.*` [E, 2I, H] (+ quantization tensors), `down.*` [E, H, I];
    weights, ids: [T, k] of `route`. -> [T, H] in x's dtype: sum_j weights[t, j] * expert_{ids[t, j]}(x[t])."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        token, slot = torch.where(ids == e)
        w = expert_tensors(experts, e)
        gate, up = linear(x[token], w, "gate_up", out_dtype=x.dtype).chunk(2, dim=-1)  # [n, I] each
        y = linear(gated_activation(gate, up, activation), w, "down", out_dtype=x.dtype)  # [n, H]
        out.index_add_(0, token, y.float() * weights[token, slot, None])
    return out.to(x.dtype)
