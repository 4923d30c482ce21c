"""Quantized GEMMs for small and medium M (Triton): W4A16 groupwise (AWQ, GPTQ) and FP8 W8A8.

Both read the checkpoint layout as is (trtc/formats/quant_layout.py), so CPU and GPU engines hold the
same bytes:

W4A16: weight uint8 [N, K/2] read as int32 [N, K/8] (column k in nibble k % 8 of word k // 8).
  The GEMM is computed swapped, out^T = W x^T, so that the dequantized weight tile [BLOCK_N, BLOCK_K]
  is the tensor cores' A operand and tiny M is their N (>= 16). A tile of words is loaded one
  iteration ahead, interleaved in registers to [BLOCK_N, BLOCK_K], shifted and masked into integers
  u 0..15, made 16-bit floats u + 128 (bf16; fp16: u + 1024) by setting exponent bits instead of
  int->float conversions, the bias taken out with sum(x). When the quantization group spans the
  tile, its scale and zero apply once per tile after the dot:
      acc^T += s * ((u + 128) @ x^T) - ((z + 128) * s) * sum(x);   smaller groups dequantize first.
  x' = (x * pre_quant_scale)[..., input_perm] is formed on load.
  Measured on the H200 (benchmarks/quant_gemm.py, Llama-8B shapes, M 1-16): 620-830 GB/s, 0.77x the
  bf16 cuBLAS GEMM; the loop, not memory, bounds it (the B-operand form through shared memory gave
  0.55-0.66x, one load per column from L1 0.10x).
FP8:   x already quantized (float8_e4m3fn [M, K], by the kernel before the GEMM), weight fp8 [N, K];
  acc = x @ w^T on the FP8 tensor cores, scaled by input_scale * weight_scale (per tensor or per
  output channel) in the epilogue.

Split-K: with SPLIT_K > 1 each program writes its float32 partial tile to a workspace; the last
program of a tile to arrive (a counter per tile, self-resetting) sums the partials in split order,
so results do not depend on timing, and writes the output. One launch, no memset, graph-capturable.
bytes ~= N*K/2 (+ N*K/group*4 scales) for W4A16, N*K for FP8, + M*K*2 + M*N*2.
"""

from __future__ import annotations

import atexit
import weakref

import torch
import triton
import triton.language as tl

LOCKS_PER_DEVICE = 1 << 16
# held by the runners that use them (ModelRunner keeps its device's): freed with the last of them
_locks: weakref.WeakValueDictionary[torch.device, torch.Tensor] = weakref.WeakValueDictionary()


@atexit.register
def _release_locks() -> None:
    _locks.clear()  # while CUDA is alive: freeing device memory during interpreter teardown can crash


def split_k_locks(device: torch.device) -> torch.Tensor:
    """The per-tile counters of split-K launches on `device` (zero between launches). Allocate them
    before any CUDA graph capture and keep a reference while they are used (ModelRunner does) so
    that they live outside graph pools; they are freed with the last reference."""
    locks = _locks.get(device)
    if locks is None:
        locks = _locks[device] = torch.zeros(LOCKS_PER_DEVICE, dtype=torch.int32, device=device)
    return locks


@triton.jit
def _load_x_t(x_ptr, stride_xm, m, k, m_mask, k_mask, pqs_ptr, perm_ptr, HAS_PQS: tl.constexpr, HAS_PERM: tl.constexpr):
    """x'^T[k, m] = (x * pre_quant_scale)[m, perm[k]] for columns k [BK] and rows m [BM], as x's dtype."""
    col = k
    if HAS_PERM:
        col = tl.load(perm_ptr + k, mask=k_mask, other=0)
    xv = tl.load(x_ptr + m[None, :] * stride_xm + col[:, None], mask=k_mask[:, None] & m_mask[None, :], other=0.0)
    if HAS_PQS:
        s = tl.load(pqs_ptr + col, mask=k_mask, other=0.0).to(x_ptr.dtype.element_ty)  # as the reference
        xv = (xv.to(tl.float32) * s.to(tl.float32)[:, None]).to(x_ptr.dtype.element_ty)
    return xv


@triton.jit
def _quant_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, pqs_ptr, perm_ptr, xscale_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, stride_xm, stride_w, stride_sn, stride_om,
    W_INT4: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_PQS: tl.constexpr,
    HAS_PERM: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = n < N
    m_mask = m < M
    n64 = n.to(tl.int64)
    m64 = m.to(tl.int64)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)

    if W_INT4:  # swapped: acc^T [BN, BM] = W [BN, BK] @ x^T [BK, BM]; W dequantized in registers is the A operand
        WORDS: tl.constexpr = BLOCK_K // 8
        i = tl.arange(0, WORDS)
        kk = tl.arange(0, BLOCK_K)
        shifts = (kk % 8) * 4  # column k sits in nibble k % 8 of word k // 8
        w_ptrs = w_ptr + n64[:, None] * stride_w + (k_lo // 8 + i)[None, :]
        words_next = tl.load(w_ptrs, mask=n_mask[:, None] & ((k_lo + 8 * i) < k_hi)[None, :], other=0)
        acc_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + kk
            k_mask = k < K
            words = words_next  # [BN, BK/8] int32, loaded one iteration ahead: the next tile is in flight
            w_ptrs += WORDS
            words_next = tl.load(w_ptrs, mask=n_mask[:, None] & ((k0 + BLOCK_K + 8 * i) < k_hi)[None, :], other=0)
            x_t = _load_x_t(x_ptr, stride_xm, m64, k, m_mask, k_mask, pqs_ptr, perm_ptr, HAS_PQS, HAS_PERM)  # [BK, BM]
            words = tl.interleave(words, words)
            words = tl.interleave(words, words)
            words = tl.interleave(words, words)  # [BN, BK]: each word repeated for its 8 columns
            # u + MAGIC as a 16-bit float built from its bits (no int->float conversion): bf16 0x4300 = 128,
            # fp16 0x6400 = 1024, whose unit in the last place is 1, so 128 + u (1024 + u) is exact
            if x_ptr.dtype.element_ty == tl.float16:
                biased = (((words >> shifts[None, :]) & 0xF) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                MAGIC: tl.constexpr = 1024.0
            else:
                biased = (((words >> shifts[None, :]) & 0xF) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                MAGIC: tl.constexpr = 128.0
            if GROUP >= BLOCK_K:  # one group per tile: scale after the dot
                g = k0 // GROUP
                s = tl.load(scale_ptr + n64 * stride_sn + g, mask=n_mask, other=0.0)
                if HAS_ZERO:
                    z = tl.load(zero_ptr + n64 * stride_sn + g, mask=n_mask, other=0).to(tl.float32)
                else:
                    z = tl.full([BLOCK_N], 8.0, tl.float32)
                part = tl.dot(biased.to(x_t.dtype), x_t)  # (u + MAGIC) @ x^T
                xsum = tl.sum(x_t.to(tl.float32), axis=0)  # [BM]
                acc_t += part * s[:, None] - ((z + MAGIC) * s)[:, None] * xsum[None, :]
            else:  # several groups per tile: dequantize, then the dot
                g = (k // GROUP).to(tl.int64)
                gmask = n_mask[:, None] & k_mask[None, :]
                s = tl.load(scale_ptr + n64[:, None] * stride_sn + g[None, :], mask=gmask, other=0.0)
                if HAS_ZERO:
                    z = tl.load(zero_ptr + n64[:, None] * stride_sn + g[None, :], mask=gmask, other=0).to(tl.float32)
                else:
                    z = 8.0
                acc_t += tl.dot(((biased.to(tl.float32) - (z + MAGIC)) * s).to(x_t.dtype), x_t)
        acc = tl.trans(acc_t)
    else:
        kk = tl.arange(0, BLOCK_K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k_mask = (k0 + kk) < K
            xv = tl.load(x_ptr + m64[:, None] * stride_xm + (k0 + kk)[None, :],
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            wv = tl.load(w_ptr + n64[:, None] * stride_w + (k0 + kk)[None, :],
                         mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(xv, tl.trans(wv), acc)
        xs = tl.load(xscale_ptr)
        if PER_CHANNEL:
            ws = tl.load(scale_ptr + n, mask=n_mask, other=0.0)
            acc = acc * (xs * ws)[None, :]
        else:
            acc = acc * (xs * tl.load(scale_ptr))

    out_mask = m_mask[:, None] & n_mask[None, :]
    out_offs = m64[:, None] * stride_om + n64[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tile_elems = (tl.num_programs(1) * BLOCK_M) * N  # one split's partials: [M_pad, N] float32
        part_offs = m64[:, None] * N + n64[None, :]
        tl.store(part_ptr + pid_k * tile_elems + part_offs, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial stored before the counter's release
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # the last of the tile's splits: sum in split order
            total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(part_ptr + s * tile_elems + part_offs, mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + out_offs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock_ptr + tile, 0)


def launch(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *, out_dtype: torch.dtype,
    weight_zero: torch.Tensor | None = None, pre_quant_scale: torch.Tensor | None = None,
    input_perm: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None, block_m: int = 16, block_n: int = 64, block_k: int = 128,
    split_k: int = 1, num_warps: int = 4, num_stages: int = 3,
) -> torch.Tensor:
    """x: [M, K] (model dtype for W4A16; float8_e4m3fn for FP8, quantized with input_scale);
    weight: uint8 [N, K/2] (W4A16) or float8_e4m3fn [N, K]; weight_scale: float32 [N, K/group]
    (W4A16, weight_zero uint8 alike), [] or [N] (FP8). Returns [M, N] in out_dtype."""
    int4 = weight.dtype == torch.uint8
    m, k = x.shape
    n = weight.shape[0]
    assert x.stride(-1) == 1 and weight.is_contiguous()
    if int4:
        assert weight.shape[1] * 2 == k and k % 8 == 0, (x.shape, weight.shape)
        w, group, scale = weight.view(torch.int32), k // weight_scale.shape[1], weight_scale  # w: [N, K/8]
        assert block_k <= group or block_k % group == 0
    else:
        assert weight.shape[1] == k and x.dtype == weight.dtype and input_scale is not None, (x.dtype, weight.dtype)
        w, group, scale = weight, 0, weight_scale
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    grid_m = triton.cdiv(m, block_m)
    grid = (triton.cdiv(n, block_n), grid_m, split_k)
    if split_k > 1:
        part = torch.empty((split_k, grid_m * block_m, n), dtype=torch.float32, device=x.device)
        locks = split_k_locks(x.device)
        assert grid[0] * grid[1] <= locks.numel()
    else:
        part = locks = out  # unused
    dummy = scale
    _quant_gemm_kernel[grid](
        x, w, scale, weight_zero if weight_zero is not None else dummy,
        pre_quant_scale if pre_quant_scale is not None else dummy,
        input_perm if input_perm is not None else dummy,
        input_scale if input_scale is not None else dummy,
        bias if bias is not None else dummy, out, part, locks,
        m, n, k, x.stride(0), w.stride(0), scale.stride(0) if scale.dim() == 2 else 0, out.stride(0),
        W_INT4=int4, GROUP=group, HAS_ZERO=weight_zero is not None, HAS_PQS=pre_quant_scale is not None,
        HAS_PERM=input_perm is not None, PER_CHANNEL=(not int4) and scale.dim() == 1, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out

