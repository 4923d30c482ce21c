"""Mixture of experts: `moe` routes each token to its top-k experts and sums their gated MLPs,
weighted. Triton's fused grouped GEMMs (`triton.py`) on CUDA bf16/fp16 activations with bf16/fp16 or
FP8 experts and SiLU; the PyTorch reference (`reference.py`) otherwise (CPU; INT4 experts on any
device, see `kernel_takes`)."""

from __future__ import annotations

import torch

from trtc.formats.quant_layout import FP8
from trtc.plugins.dispatch import use_triton
from trtc.plugins.gemm import linear
from trtc.plugins.moe import reference
from trtc.plugins.moe.reference import route

EXPERT_TENSORS = ("weight", "weight_scale", "input_scale", "weight_zero", "pre_quant_scale")


def experts_of(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The engine tensors of expert stack `prefix` (`layers.{i}.mlp.experts`) by their names under it
    (`gate_up.weight` [E, 2I, H], `down.weight` [E, H, I], scales...)."""
    return {f"{m}.{t}": weights[f"{prefix}.{m}.{t}"] for m in ("gate_up", "down") for t in EXPERT_TENSORS
            if f"{prefix}.{m}.{t}" in weights}


def moe(x: torch.Tensor, router_weight: torch.Tensor, experts: dict[str, torch.Tensor], top_k: int,
        normalize_topk: bool, activation: str = "silu") -> torch.Tensor:
    """x: [T, H]; router_weight: [E, H]; experts: `experts_of`. -> [T, H] in x's dtype."""
    logits = linear(x, {"router.weight": router_weight}, "router")  # [T, E]
    weights, ids = route(logits, top_k, normalize_topk)  # [T, k] each
    return run_experts(x, experts, weights, ids, activation)


def run_experts(x: torch.Tensor, experts: dict[str, torch.Tensor], weights: torch.Tensor, ids: torch.Tensor,
                activation: str = "silu") -> torch.Tensor:
    """x: [T, H]; weights (float32), ids (int64): [T, k] of `route` -> [T, H]: the experts' weighted sum."""
    if _use_kernel(x, experts, activation):
        from trtc.plugins.moe import triton as kernels

        return kernels.fused_moe(x, experts, weights, ids)
    return reference.fused_moe(x, experts, weights, ids, activation)


def kernel_takes(experts: dict[str, torch.Tensor], activation: str) -> bool:
    """Whether the fused kernel runs these experts (on CUDA): SiLU, bf16/fp16 or FP8 weights. INT4
    experts (uint8 packed, W4A16) run the reference loop, each expert through the GEMM plugin's INT4
    path: correct, but with a host sync per step (the experts chosen), so not CUDA-graph capturable."""
    return experts["gate_up.weight"].dtype in (torch.bfloat16, torch.float16, FP8) and activation == "silu"


def _use_kernel(x: torch.Tensor, experts: dict[str, torch.Tensor], activation: str) -> bool:
    return use_triton(x) and experts["gate_up.weight"].is_cuda and kernel_takes(experts, activation)


__all__ = ["experts_of", "kernel_takes", "moe", "route", "run_experts"]
