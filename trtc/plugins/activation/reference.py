"""Activations of the MLP, and the gated form down(act(gate) * up)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATION_FNS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: torch.square(F.relu(x)),  # squared ReLU (Nemotron)
}


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    # gate, up: [..., intermediate]
    return ACTIVATION_FNS[activation](gate) * up


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    # gate_up: [..., 2 * intermediate], gate first -> [..., intermediate]
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
