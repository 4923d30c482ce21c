"""Fused mixture of experts (Triton): tokens grouped by expert, one grouped GEMM launch for every
expert's gate_up (with SwiGLU in its epilogue) and one for every expert's down (the top-k weight
applied in its epilogue), then the k weighted outputs of each token summed.

    align:   the T*k (token, slot) pairs sorted by expert, each expert's run padded to a multiple of
             BLOCK_M, an expert id per block of BLOCK_M pairs (device ops only: no host sync, the
             grid is sized by the bound cdiv(T*k, BLOCK_M) + min(E, T*k) blocks, blocks past the end
             exit at once; CUDA-graph capturable)
    gate_up: program (block, n-tile): x rows of the block's pairs [BM, H] @ w_gate_up[e]^T for the
             gate and the up rows of its tile -> silu(gate) * up -> act [T*k, I]
    down:    act rows [BM, I] @ w_down[e]^T -> * topk weight -> out [T*k, H] float32 -> sum over k
Decode-sized steps (a few tokens per expert) give one block per active expert: each active
expert's weights are read once per step, the others not at all.

FP8 experts (quant_layout.py: weight fp8 [E, N, K], weight_scale [E, N], input_scale [E]): each
block quantizes its activation rows with its expert's input scale on load, runs the FP8 tensor-core
dot, and scales by input_scale * weight_scale per output column, as the reference's fp8_linear.
Rounding follows the reference (trtc/plugins/moe/reference.py): GEMM outputs rounded to the
activation dtype, silu and the product rounded as gated_activation rounds, the weighted sum in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtc.plugins.fp8_triton import fp8_saturate


def align(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids: [T, k] expert ids -> (pairs [NB * block_m] int32: indices t * k + j sorted by expert,
    each expert's run padded with T * k to a multiple of block_m; block_expert [NB] int32, -1 past the
    last run), NB = cdiv(T * k, block_m) + min(E, T * k)."""
    flat = ids.flatten()
    n, dev = flat.numel(), ids.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    ends = torch.cumsum(padded, 0)
    first = torch.cumsum(counts, 0) - counts  # [E] each expert's first pair in sorted order
    order = torch.argsort(flat, stable=True)  # [n]
    expert = flat[order]
    dest = (ends - padded)[expert] + torch.arange(n, device=dev) - first[expert]
    nb = triton.cdiv(n, block_m) + min(num_experts, n)
    pairs = torch.full((nb * block_m,), n, dtype=torch.int32, device=dev)
    pairs[dest] = order.to(torch.int32)
    starts = torch.arange(nb, device=dev) * block_m
    block_expert = torch.searchsorted(ends, starts, right=True)  # the run holding each block's first slot
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return pairs, block_expert


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, act_ptr, pairs_ptr, block_expert_ptr, w_scale_ptr, in_scale_ptr,
                    num_pairs, top_k, K, N, stride_x, stride_we, stride_wn, stride_act,
                    FP8: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """act[p, n] = silu(gate) * up of pair p's token through its expert, for n in this tile."""
    b, nb = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert_ptr + b)
    if e < 0:
        return
    pair = tl.load(pairs_ptr + b * BM + tl.arange(0, BM))  # [BM]
    valid = pair < num_pairs
    tok = (pair // top_k).to(tl.int64)
    n = nb * BN + tl.arange(0, BN)
    n_mask = n < N
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    if FP8:
        s_in = tl.load(in_scale_ptr + e)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        k_mask = k < K
        a = tl.load(x_ptr + tok[:, None] * stride_x + k[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        wg = tl.load(w_base + n[None, :] * stride_wn + k[:, None], mask=w_mask, other=0.0)  # [BK, BN]
        wu = tl.load(w_base + (n[None, :] + N) * stride_wn + k[:, None], mask=w_mask, other=0.0)
        if FP8:
            a = fp8_saturate(a, s_in).to(wg.dtype)
        acc_g += tl.dot(a, wg)
        acc_u += tl.dot(a, wu)
    dtype = act_ptr.dtype.element_ty
    if FP8:
        scale_row = w_scale_ptr + e.to(tl.int64) * 2 * N
        acc_g *= s_in * tl.load(scale_row + n, mask=n_mask, other=0.0)[None, :]
        acc_u *= s_in * tl.load(scale_row + N + n, mask=n_mask, other=0.0)[None, :]
    g = acc_g.to(dtype).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    y = (act * acc_u.to(dtype).to(tl.float32)).to(dtype)
    tl.store(act_ptr + pair.to(tl.int64)[:, None] * stride_act + n[None, :], y,
             mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(act_ptr, w_ptr, out_ptr, pairs_ptr, block_expert_ptr, topk_ptr, w_scale_ptr, in_scale_ptr,
                 num_pairs, K, N, stride_act, stride_we, stride_wn, stride_out,
                 FP8: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """out[p, n] = topk_weight[p] * (act[p] @ w_down[e]^T)[n], float32."""
    b, nb = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert_ptr + b)
    if e < 0:
        return
    pair = tl.load(pairs_ptr + b * BM + tl.arange(0, BM)).to(tl.int64)
    valid = pair < num_pairs
    n = nb * BN + tl.arange(0, BN)
    n_mask = n < N
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if FP8:
        s_in = tl.load(in_scale_ptr + e)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        k_mask = k < K
        a = tl.load(act_ptr + pair[:, None] * stride_act + k[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_base + n[None, :] * stride_wn + k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if FP8:
            a = fp8_saturate(a, s_in).to(w.dtype)
        acc += tl.dot(a, w)
    if FP8:
        acc *= s_in * tl.load(w_scale_ptr + e)
    weight = tl.load(topk_ptr + pair, mask=valid, other=0.0)  # [BM] float32
    y = acc.to(OUT_DTYPE).to(tl.float32) * weight[:, None]
    tl.store(out_ptr + pair[:, None] * stride_out + n[None, :], y, mask=valid[:, None] & n_mask[None, :])


def block_m_for(num_pairs: int, num_experts: int) -> int:
    """Pairs per block: 16 (the smallest tensor-core tile) while experts get a few tokens each, 64 past."""
    return 16 if num_pairs <= 16 * num_experts else 64


_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def fused_moe(x: torch.Tensor, experts: dict[str, torch.Tensor], weights: torch.Tensor, ids: torch.Tensor,
              block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """x: [T, H] bf16/fp16; experts: `gate_up.weight` [E, 2I, H], `down.weight` [E, H, I] in x's dtype or
    FP8 with `*.weight_scale` ([E, 2I], [E]) and `*.input_scale` [E]; weights, ids: [T, k] (float32,
    int64) of the router. -> [T, H] in x's dtype."""
    gate_up, down = experts["gate_up.weight"], experts["down.weight"]
    num_experts, two_i, hidden = gate_up.shape
    inter = two_i // 2
    t, top_k = ids.shape
    n = t * top_k
    if n == 0:
        return torch.zeros_like(x)
    fp8 = "gate_up.input_scale" in experts
    x = x.contiguous()
    bm = block_m_for(n, num_experts)
    pairs, block_expert = align(ids, num_experts, bm)
    nb = block_expert.shape[0]
    act = torch.empty((n, inter), dtype=x.dtype, device=x.device)
    dummy = torch.empty(1, dtype=torch.float32, device=x.device)
    _gate_up_kernel[(nb, triton.cdiv(inter, block_n))](
        x, gate_up, act, pairs, block_expert,
        experts.get("gate_up.weight_scale", dummy), experts.get("gate_up.input_scale", dummy),
        n, top_k, hidden, inter, x.stride(0), gate_up.stride(0), gate_up.stride(1), act.stride(0),
        FP8=fp8, BM=bm, BN=block_n, BK=block_k, num_warps=4,
    )
    out = torch.empty((n, hidden), dtype=torch.float32, device=x.device)
    _down_kernel[(nb, triton.cdiv(hidden, block_n))](
        act, down, out, pairs, block_expert, weights.contiguous().float(),
        experts.get("down.weight_scale", dummy), experts.get("down.input_scale", dummy),
        n, inter, hidden, act.stride(0), down.stride(0), down.stride(1), out.stride(0),
        FP8=fp8, BM=bm, BN=block_n, BK=block_k, OUT_DTYPE=_TL_DTYPE[x.dtype], num_warps=4,
    )
    return out.view(t, top_k, hidden).sum(dim=1).to(x.dtype)
