"""W4A16 GEMMs for large M on the tensor cores (Triton): the INT4 weight dequantized to the model dtype
in the GEMM's mainloop (Marlin-style, in registers), or once into a workspace for cuBLAS.

Both read the checkpoint layout as is (trtc/formats/quant_layout.py; reference: w4a16.py):
weight uint8 [N, K/2] read as int32 [N, K/8] (column k in nibble k % 8 of word k // 8), weight_scale
float32 [N, K/G], weight_zero uint8 [N, K/G] (absent: symmetric, zero 8), pre_quant_scale [K].

`gemm` (tactic "triton_tc"): one program per output tile [BLOCK_M, BLOCK_N]; per K step it loads the
x tile [BLOCK_M, BLOCK_K] (pipelined over num_stages) and the weight words [BLOCK_N, BLOCK_K/8],
spreads each word over its 8 columns (three interleaves), and dequantizes without int->float
conversions (a shift, a mask, a shift-add, one fma per weight, then the cast):
    b = float32 from bits(0x43000000 + (u << 16)) = 128 + u,   w = dtype(fma(b, s, -(128 + z) s))
where the fma's product is exact and the constant's rounding (<= 143 s 2^-24) is far below the
dtype's, so w is the reference's (u - z) s within that (u = z gives |w| <= 2^-16 s, not 0).
SASS for sm_90 (Triton 3.9's compiler, 128x128x64 tiles, 8 warps): the mainloop is 234 instructions
a K step per thread (32 weights: ~3.5 each to dequantize, the rest loads and addressing), against 279
for the exact (2^23 + u - (2^23 + z)) * s; wgmma (HGMMA 64x128x16) with the x tiles through cp.async.
Those instructions take about as many issue cycles as the tensor cores take for 128 rows of x, so
256-row tiles halve their share (compiler/autotune.py's TC_CANDIDATES).
x' = (x * pre_quant_scale)[..., input_perm] is formed first, as the reference does (one pass over x,
M K 2 bytes read and written; in the mainloop it cost a product per weight of every M tile), so x
goes to the tensor cores as loaded.
swap_ab computes out^T = W x^T: the dequantized tile is the A operand, which Hopper's wgmma takes
from registers; without it W^T is the B operand, through shared memory. (In SASS swap_ab still moves
the tile through shared memory to the operand layout and waits on each wgmma: 264 instructions.)
fp32 accumulation; bias in the epilogue. split_k > 1 (small-N layers, o and down, at a few hundred
rows, whose output tiles alone leave SMs idle): K in split_k parts, the float32 partials summed in
split order by the last program of the tile to arrive, as triton_quant.py does (deterministic, one
launch, graph-capturable; the counters from split_k_locks).
flops = 2 M N K; bytes ~= N K / 2 + N K / G * (4 + 1) + M K 2 + M N 2.

`dequantize` (tactic "dequant_mm" on a GPU): w' = dequantized weight (x pre_quant_scale, folded in
once here: x is then used as it is, but for a GPTQ input_perm's gather) [N, K] in the model dtype,
written once per call to a workspace; then cuBLAS bf16 GEMM. bytes += 2 N K * 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from trtc.plugins.gemm.triton_quant import split_k_locks
from trtc.plugins.gemm.w4a16 import w4a16_input

GROUP_M = 8  # output tiles of BLOCK_M rows walked together, so that their weight tiles stay in L2


@triton.jit
def _dequant_tile(w_ptr, scale_ptr, zero_ptr, pqs_ptr, n64, k0, K, stride_w, stride_sn,
                  GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_PQS: tl.constexpr, EVEN_K: tl.constexpr,
                  DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The weight rows n64 [BLOCK_N] (in range), columns k0 .. k0 + BLOCK_K, dequantized: [BLOCK_N, BLOCK_K]
    DTYPE (columns past K hold finite values, which meet x's zeros there)."""
    MAGIC: tl.constexpr = 128.0  # float32 128 + u has the bits 0x43000000 + (u << 16)
    WORDS: tl.constexpr = BLOCK_K // 8
    i = tl.arange(0, WORDS)
    kk = tl.arange(0, BLOCK_K)
    k = k0 + kk
    w_ptrs = w_ptr + n64[:, None] * stride_w + (k0 // 8 + i)[None, :]
    if EVEN_K:
        words = tl.load(w_ptrs)
    else:
        words = tl.load(w_ptrs, mask=((k0 + 8 * i) < K)[None, :], other=0)  # [BN, BK/8] int32
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)  # [BN, BK]: each word repeated for its 8 columns
    nibble = (words >> ((kk % 8) * 4)[None, :]) & 0xF
    biased = ((nibble << 16) + 0x43000000).to(tl.float32, bitcast=True)  # 128 + u, no int->float conversion
    if GROUP % BLOCK_K == 0:  # the tile lies in one group: a scale and zero per row
        g = k0 // GROUP
        s = tl.load(scale_ptr + n64 * stride_sn + g)
        if HAS_ZERO:
            z = tl.load(zero_ptr + n64 * stride_sn + g).to(tl.float32)
        else:
            z = 8.0
        c = (-((z + MAGIC) * s))[:, None]
        s = s[:, None]
    else:  # groups smaller than the tile, or straddling it: per column
        g = (tl.minimum(k, K - 1) // GROUP).to(tl.int64)
        s = tl.load(scale_ptr + n64[:, None] * stride_sn + g[None, :])
        if HAS_ZERO:
            z = tl.load(zero_ptr + n64[:, None] * stride_sn + g[None, :]).to(tl.float32)
        else:
            z = 8.0
        c = -((z + MAGIC) * s)
    # (128 + u) s - (128 + z) s in one fma: the product is exact inside it, the rounding of the constant
    # (<= 2^-24 * 136 s) stays far below the dtype's, so w rounds as the reference's (u - z) s
    w = tl.fma(biased, s, c)
    if HAS_PQS:
        if EVEN_K:
            p = tl.load(pqs_ptr + k)
        else:
            p = tl.load(pqs_ptr + k, mask=k < K, other=0.0)
        w = w * p[None, :]  # float32, not rounded to the dtype first as x * pqs is
    return w.to(DTYPE)


@triton.jit
def _w4a16_tc_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, pqs_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, stride_xm, stride_w, stride_sn, stride_om,
    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_PQS: tl.constexpr, HAS_BIAS: tl.constexpr,
    SWAP_AB: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m64 = (m % M).to(tl.int64)  # rows past M / N read row 0.., their results are not stored
    n64 = (n % N).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        x_ptrs = x_ptr + m64[:, None] * stride_xm + (k0 + kk)[None, :]
        if EVEN_K:
            xv = tl.load(x_ptrs)
        else:
            xv = tl.load(x_ptrs, mask=((k0 + kk) < K)[None, :], other=0.0)  # [BM, BK]
        wv = _dequant_tile(w_ptr, scale_ptr, zero_ptr, pqs_ptr, n64, k0, K, stride_w, stride_sn,
                           GROUP, HAS_ZERO, HAS_PQS, EVEN_K, DTYPE, BLOCK_N, BLOCK_K)  # [BN, BK]
        if SWAP_AB:
            acc = tl.dot(wv, tl.trans(xv), acc)  # [BN, BM]
        else:
            acc = tl.dot(xv, tl.trans(wv), acc)  # [BM, BN]
    if SWAP_AB:
        acc = tl.trans(acc)
    out_mask = (m < M)[:, None] & (n < N)[None, :]
    out_offs = m.to(tl.int64)[:, None] * stride_om + n.to(tl.int64)[None, :]
    if SPLIT_K > 1:  # float32 partials; the last of the tile's splits to arrive sums them in split order
        split_elems = (grid_m * BLOCK_M).to(tl.int64) * N  # one split's partials: [M_pad, N]
        part_offs = m.to(tl.int64)[:, None] * N + n.to(tl.int64)[None, :]
        tl.store(part_ptr + pid_k * split_elems + part_offs, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial stored before the counter's release
        arrived = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            if SPLIT_K == 2:  # a + b == b + a: whichever arrives last, the same bytes
                acc += tl.load(part_ptr + (1 - pid_k) * split_elems + part_offs, mask=out_mask, other=0.0,
                               cache_modifier=".cg")
            else:
                acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for s in range(SPLIT_K):
                    acc += tl.load(part_ptr + s * split_elems + part_offs, mask=out_mask, other=0.0,
                                   cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(bias_ptr + n64).to(tl.float32)[None, :]
            tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock_ptr + pid, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n64).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dequant_kernel(w_ptr, scale_ptr, zero_ptr, pqs_ptr, out_ptr, N, K, stride_w, stride_sn, stride_o,
                    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_PQS: tl.constexpr, EVEN_K: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    k = k0 + tl.arange(0, BLOCK_K)
    wv = _dequant_tile(w_ptr, scale_ptr, zero_ptr, pqs_ptr, (n % N).to(tl.int64), k0, K, stride_w, stride_sn,
                       GROUP, HAS_ZERO, HAS_PQS, EVEN_K, out_ptr.dtype.element_ty, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + n.to(tl.int64)[:, None] * stride_o + k[None, :], wv, mask=(n < N)[:, None] & (k < K)[None, :])


def _int4_args(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               weight_zero: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    k = weight.shape[1] * 2
    assert weight.dtype == torch.uint8 and weight.is_contiguous() and k % 8 == 0, (weight.dtype, weight.shape)
    assert x.shape[-1] == k and x.dtype in (torch.bfloat16, torch.float16), (x.shape, x.dtype)
    assert weight_scale.stride(-1) == 1 and (weight_zero is None or weight_zero.stride() == weight_scale.stride())
    return weight.view(torch.int32), k // weight_scale.shape[1]  # [N, K/8], group


def _gather(x: torch.Tensor, pre_quant_scale: torch.Tensor | None,
            input_perm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [M, K] -> x[:, input_perm] (a GPTQ act-order layer), last dim contiguous, and the
    pre_quant_scale of the permuted columns (pqs[input_perm]), which `dequantize` folds into the weight."""
    if input_perm is not None:
        x = x.index_select(1, input_perm.long())
        if pre_quant_scale is not None:
            pre_quant_scale = pre_quant_scale.index_select(0, input_perm.long())
    return (x if x.stride(-1) == 1 else x.contiguous()), pre_quant_scale


def gemm(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, weight_zero: torch.Tensor | None = None,
    pre_quant_scale: torch.Tensor | None = None, input_perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None, *, block_m: int = 128, block_n: int = 128, block_k: int = 64,
    swap_ab: bool = False, split_k: int = 1, num_warps: int = 8, num_stages: int = 4,
) -> torch.Tensor:
    """x: [M, K] bf16/fp16; weight uint8 [N, K/2]; weight_scale float32 [N, K/G] (weight_zero uint8
    alike); pre_quant_scale [K]; input_perm int32 [K]; bias [N] -> [M, N] in x's dtype."""
    w, group = _int4_args(x, weight, weight_scale, weight_zero)
    assert block_k % 8 == 0 and block_k >= 16, block_k
    x = w4a16_input(x, pre_quant_scale, input_perm)  # the reference's x' (one pass over x, if any)
    x = x if x.stride(-1) == 1 else x.contiguous()
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    grid_m = triton.cdiv(m, block_m)
    grid = (grid_m * triton.cdiv(n, block_n), split_k)
    if split_k > 1:
        part = torch.empty((split_k, grid_m * block_m, n), dtype=torch.float32, device=x.device)
        locks = split_k_locks(x.device)
        assert grid[0] <= locks.numel()
    else:
        part = locks = out  # unused
    _w4a16_tc_kernel[grid](
        x, w, weight_scale, weight_zero if weight_zero is not None else weight_scale, weight_scale,
        bias if bias is not None else weight_scale, out, part, locks,
        m, n, k, x.stride(0), w.stride(0), weight_scale.stride(0), out.stride(0),
        GROUP=group, HAS_ZERO=weight_zero is not None, HAS_PQS=False,
        HAS_BIAS=bias is not None, SWAP_AB=swap_ab, EVEN_K=k % block_k == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M, SPLIT_K=split_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def dequantize(weight: torch.Tensor, weight_scale: torch.Tensor, weight_zero: torch.Tensor | None,
               pre_quant_scale: torch.Tensor | None, dtype: torch.dtype, block_n: int = 64,
               block_k: int = 128) -> torch.Tensor:
    """weight uint8 [N, K/2] -> (u - z) * s (* pre_quant_scale[k]) [N, K] in `dtype` (one kernel)."""
    n, k = weight.shape[0], weight.shape[1] * 2
    w, group = _int4_args(torch.empty(0, k, dtype=dtype), weight, weight_scale, weight_zero)
    out = torch.empty((n, k), dtype=dtype, device=weight.device)
    _dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        w, weight_scale, weight_zero if weight_zero is not None else weight_scale,
        pre_quant_scale if pre_quant_scale is not None else weight_scale, out,
        n, k, w.stride(0), weight_scale.stride(0), out.stride(0),
        GROUP=group, HAS_ZERO=weight_zero is not None, HAS_PQS=pre_quant_scale is not None,
        EVEN_K=k % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out


def dequant_mm(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, weight_zero: torch.Tensor | None = None,
    pre_quant_scale: torch.Tensor | None = None, input_perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """As `gemm`, by a dequantized copy of the weight [N, K] (a workspace of this call) and cuBLAS."""
    x, pre_quant_scale = _gather(x, pre_quant_scale, input_perm)
    return F.linear(x, dequantize(weight, weight_scale, weight_zero, pre_quant_scale, x.dtype), bias)
