"""Rotary position embedding (rotate-half layout, as HF Llama checkpoints store q/k).

Inverse frequencies for the RoPE kinds of the layer graph, following HF transformers'
`modeling_rope_utils`. cos/sin are computed in float32 and cast to the activations' dtype.
"""

from __future__ import annotations

import math

import torch

from trtc.formats.graph import RopeConfig


def inv_freq(rope: RopeConfig, head_dim: int, seq_len: int = 0, max_position_embeddings: int = 0) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies.

    seq_len and max_position_embeddings matter only for dynamic NTK scaling, which rescales the
    base once the sequence is longer than max_position_embeddings (a no-op below it), and for
    longrope, whose long factors replace the short ones once seq_len passes the original context.
    head_dim is the rotary dimension (a partial rotary rotates the first dims of a head only).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    base = rope.theta
    if rope.type == "dynamic" and seq_len > max_position_embeddings > 0:
        f = rope.factor
        base = base * ((f * seq_len / max_position_embeddings) - (f - 1)) ** (head_dim / (head_dim - 2))
    freq = 1.0 / (base**exponents)
    if rope.type == "longrope":
        long = seq_len > rope.original_max_position_embeddings
        freq = freq / torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
    if rope.type == "linear":
        freq = freq / rope.factor
    elif rope.type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > low_wavelen, freq / rope.factor, freq)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        freq = torch.where(medium, smoothed, scaled)
    return freq


def rope_cos_sin(
    freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    # freq: [rotary_dim // 2]; positions: [N] -> cos, sin: [N, rotary_dim], times `scale` (longrope's attention factor)
    angles = positions.float()[:, None] * freq.to(positions.device)[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [N, heads, head_dim]; cos, sin: [N, rotary_dim]; dims past rotary_dim pass through (partial rotary)
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    half = r // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
