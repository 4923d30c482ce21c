"""trtc's CUDA C++ W4A16 GEMM for decode-sized M (csrc/w4a16_gemm.cu) and the weight layout it reads.

At load time on a GPU, each INT4 layer's checkpoint tensors (trtc/formats/quant_layout.py: weight
uint8 [N, K/2], weight_scale [N, K/G], weight_zero) are re-packed once into the kernel's layout
(`pack`), stored beside them under PACKED_TENSORS names; the engine files stay as they are. The
kernel covers M <= MAX_M rows, N % 16 == 0, K % 128 == 0 and groups of 64 x 2^i columns or one group
over K (per-channel scales); other shapes, and larger M, take the other tactics (tactics.py).

Packed layout (what the kernel's lane (g = lane // 4, t = lane % 4) reads of 16-row n-tile `nt`
and 64-column chunk `c`):
    packed_weight  int32 [N/16, K/64, 32, 4]: word j holds rows g, g+8 at columns 64c + 16t + 4j + e
                   (e = 0..3); row g + 8h, column e sits in nibble 2 (e // 2) + h + 4 (e % 2)
    packed_scale   int32 [N/16, K/G, 8]: (scale of row g, of row g + 8) in the model dtype
    packed_zero    int32 [N/16, K/G, 8]: -(MAGIC + zero point) pairs, only with zero points
    packed_pqs     [K] model dtype, the AWQ pre_quant_scale, when there is one and no input_perm
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from trtc.formats.engine_layout import stack_depth
from trtc.formats.quant_layout import unpack_int4
from trtc.plugins.gemm.w4a16 import w4a16_input

log = logging.getLogger(__name__)
PACKED_TENSORS = ("packed_weight", "packed_scale", "packed_zero", "packed_pqs")
INT4_TENSORS = ("weight", "weight_scale", "weight_zero", "pre_quant_scale", "input_perm")
MAGIC = {torch.bfloat16: 128.0, torch.float16: 1024.0}  # 2^mantissa bits: MAGIC + u is exact for u < 16
MAX_M = 64
GEMV_MAX_M = 16  # rows up to which w4a16_gemv runs, w4a16_gemm past them
WARPS = 8  # per block: the kernel's W4A16_WARPS
RING_CHUNKS = 8  # 64-column chunks of weights in flight per warp: the kernel's W4A16_RING_CHUNKS
BLOCK_GROUPS = (1, 2, 4)  # R: n-groups per block (the kernel's R), each of tiles_per_warp(M) 16-row n-tiles
SOURCE = Path(__file__).parent / "csrc" / "w4a16_gemm.cu"


def _nibble_shifts() -> torch.Tensor:
    """[2 (h), 4 (e)] bit offset of row g + 8h, column e of a word's 2x4 block."""
    return torch.tensor([[4 * (2 * (e // 2) + h + 4 * (e % 2)) for e in range(4)] for h in range(2)], dtype=torch.int64)


def supports(n: int, k: int, group_size: int) -> bool:
    chunks = group_size // 64
    return n % 16 == 0 and k % 128 == 0 and group_size % 64 == 0 and (chunks & (chunks - 1) == 0 or group_size == k)


def group_shift(k: int, group_size: int) -> int:
    """The kernel's GS: groups of 2^GS chunks of 64 columns, or 31 for one group over K."""
    chunks = group_size // 64
    return chunks.bit_length() - 1 if chunks & (chunks - 1) == 0 else 31


def tiles_per_warp(m: int) -> int:
    """The kernels' TW: 16-row n-tiles of one warp, which share its x fragments (w4a16_gemm, past GEMV_MAX_M rows)."""
    return 1 if m <= GEMV_MAX_M else 2


def block_n(m: int, n_groups: int) -> int:
    """Output features of one block of `n_groups` n-groups at M rows: the cuda tactic's block_n."""
    return 16 * tiles_per_warp(m) * n_groups


def rows_per_tile_group(m: int) -> int:
    """The kernels' NB: n8-tiles of x's rows, 8 rows each."""
    return 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8


def gemv_rows(m: int) -> int:
    """w4a16_gemv's XR (M <= GEMV_MAX_M): the power of two >= M, x's rows in a ring slot."""
    return 1 << (m - 1).bit_length()


def shared_bytes(m: int, pqs: bool, warps: int = WARPS, ring_chunks: int = RING_CHUNKS) -> int:
    """The kernel's dynamic shared memory at M rows: each warp's ring (w4a16_gemv: ring_chunks / 2
    slots of 1152 bytes, XR rows of x of 272, 256 of pre_quant_scale; w4a16_gemm: ring_chunks chunks of
    512 bytes), or the K reduction's partial sums if larger."""
    nb, tw = rows_per_tile_group(m), tiles_per_warp(m)
    if m <= GEMV_MAX_M:
        ring = ring_chunks // 2 * (1152 + gemv_rows(m) * 272 + (256 if pqs else 0))
    else:
        ring = ring_chunks * 512
    return max(warps * ring, warps // 2 * tw * nb * 4 * 32 * 4)


def _pairs(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, groups] -> int32 [N/16, groups, 8]: the (row g, row g + 8) pairs of each n-tile, in `dtype`."""
    n, groups = t.shape
    p = t.to(dtype).view(n // 16, 2, 8, groups).permute(0, 3, 2, 1).contiguous()  # [nt, q, g, h]
    return p.view(torch.int32).view(n // 16, groups, 8)


def pack(weight: torch.Tensor, weight_scale: torch.Tensor, weight_zero: torch.Tensor | None,
         pre_quant_scale: torch.Tensor | None, input_perm: torch.Tensor | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A layer's checkpoint tensors -> its PACKED_TENSORS, on weight's device."""
    u = unpack_int4(weight)  # [N, K] uint8 in [0, 15]
    n, k = u.shape
    v = u.view(n // 16, 2, 8, k // 64, 4, 4, 4).permute(0, 3, 2, 4, 5, 1, 6)  # [nt, c, g, t, j, h, e]
    words = (v.long() << _nibble_shifts().to(u.device)).sum((-2, -1))  # [nt, c, g, t, j], the nibbles never overlap
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    out = {"packed_weight": words.reshape(n // 16, k // 64, 32, 4).contiguous(),
           "packed_scale": _pairs(weight_scale, dtype)}
    if weight_zero is not None:
        out["packed_zero"] = _pairs(-(MAGIC[dtype] + weight_zero.float()), dtype)
    if pre_quant_scale is not None and input_perm is None:  # with a permutation x is scaled before the gather
        out["packed_pqs"] = pre_quant_scale.to(dtype).contiguous()
    return out


def unpack(packed_weight: torch.Tensor) -> torch.Tensor:
    """The weight uint8 [N, K] in [0, 15], read back the way the kernel's lanes read it: register p
    of k-tile j is the pair (nibble p, nibble p + 4); registers 0 and 2 are row g, 1 and 3 row g + 8;
    the low nibble of the pair is MMA column 2t (x's column 16t + 4j + 2 (p // 2)), the high one 2t + 1."""
    nt, chunks = packed_weight.shape[:2]
    words = packed_weight.long() & 0xFFFFFFFF  # [nt, c, lane, j]
    out = torch.empty(nt, 16, chunks, 64, dtype=torch.uint8, device=packed_weight.device)
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    for j in range(4):
        for p in range(4):
            row = g + 8 * (p % 2)
            col = 16 * t + 4 * j + 2 * (p // 2)
            lo = (words[:, :, :, j] >> (4 * p)) & 15  # [nt, c, lane]
            hi = (words[:, :, :, j] >> (4 * (p + 4))) & 15
            out[:, row, :, col] = lo.permute(2, 0, 1).to(torch.uint8)  # advanced indices first: [lane, nt, c]
            out[:, row, :, col + 1] = hi.permute(2, 0, 1).to(torch.uint8)
    return out.reshape(nt * 16, chunks * 64)


@functools.cache
def _module(warps: int = WARPS, ring_chunks: int = RING_CHUNKS):
    """The kernels, compiled for blocks of `warps` warps with `ring_chunks` chunks in flight per warp
    (other values than the defaults: benchmarks/w4a16_variants.py)."""
    from trtc.plugins.cuda_jit import CudaModule

    return CudaModule(SOURCE, [_kernel(bf16, m, r, pqs) for bf16 in (True, False) for m in (1, 2, 4, 8, 16, 32, 64)
                               for r in BLOCK_GROUPS for pqs in (True, False)],
                      defines=(f"-DW4A16_WARPS={warps}", f"-DW4A16_RING_CHUNKS={ring_chunks}"))


def _kernel(bf16: bool, m: int, r: int, pqs: bool) -> str:
    """The instantiation that runs M rows."""
    shape = f"gemv<{str(bf16).lower()}, {gemv_rows(m)}" if m <= GEMV_MAX_M else f"gemm<{str(bf16).lower()}, {rows_per_tile_group(m)}"
    return f"w4a16_{shape}, {r}, {str(pqs).lower()}>"


def available(device: torch.device) -> bool:
    """Whether the kernel runs here: a CUDA GPU of compute capability 8.0 or later (bf16 MMA) and
    NVRTC to compile it (compiled now if it is not cached)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    try:
        _module().prepare(device)
    except Exception as e:  # noqa: BLE001 - no NVRTC, or it cannot target this GPU: the Triton and cuBLAS tactics remain
        log.warning("trtc's CUDA W4A16 kernel is unavailable (%s); INT4 layers use the Triton kernel", str(e).splitlines()[0])
        return False
    return True


def gemm(x: torch.Tensor, w: dict[str, torch.Tensor], bias: torch.Tensor | None, features_per_block: int = 16,
         warps: int = WARPS, ring_chunks: int = RING_CHUNKS) -> torch.Tensor:
    """x [M, K] bf16/fp16 (M <= MAX_M); w: the layer's tensors with its PACKED_TENSORS -> [M, N] in x's dtype.
    features_per_block: the tactic's block_n (`block_n`); the block's warps split K the more, the fewer there are."""
    m, k = x.shape
    packed = w["packed_weight"]
    n = packed.shape[0] * 16
    if "input_perm" in w:  # without one the kernel applies pre_quant_scale itself (packed_pqs)
        x = w4a16_input(x, w.get("pre_quant_scale"), w["input_perm"])
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.contiguous()
    n_groups = min(BLOCK_GROUPS, key=lambda r: abs(block_n(m, r) - features_per_block))
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    pqs = "packed_pqs" in w
    _module(warps, ring_chunks).launch(
        _kernel(x.dtype == torch.bfloat16, m, n_groups, pqs), (-(-n // block_n(m, n_groups)), 1, 1),
        (warps * 32, 1, 1),
        [x, packed, w["packed_scale"], w.get("packed_zero"), w.get("packed_pqs"), bias, y, m, n, k,
         group_shift(k, k // w["packed_scale"].shape[1])],
        x.device, shared_bytes(m, pqs, warps, ring_chunks),
    )
    return y


def pack_layer(w: dict[str, torch.Tensor], dtype: torch.dtype) -> bool:
    """w: one INT4 layer's tensors by name (weight, weight_scale, ...); adds its PACKED_TENSORS if the
    kernel covers its shape and dtype. Returns whether it did."""
    n, k = w["weight"].shape[0], w["weight"].shape[1] * 2
    if dtype not in MAGIC or not supports(n, k, k // w["weight_scale"].shape[1]):
        return False
    w.update(pack(w["weight"], w["weight_scale"], w.get("weight_zero"), w.get("pre_quant_scale"), w.get("input_perm"),
                  dtype))
    return True


def decode_unread(weights: dict[str, torch.Tensor]) -> set[str]:
    """The names of `weights` that a decode step does not read: the checkpoint layout of every INT4
    layer that also has the kernel's (only the packed tensors are read up to MAX_M rows)."""
    out = set()
    for name in weights:
        if name.endswith(".packed_weight"):
            p = name[: -len(".packed_weight")]
            out |= {f"{p}.{t}" for t in ("weight", "weight_scale", "weight_zero") if f"{p}.{t}" in weights}
            if f"{p}.packed_pqs" in weights:
                out.add(f"{p}.pre_quant_scale")
    return out


def prepare_weights(weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> int:
    """Add PACKED_TENSORS beside every INT4 layer of `weights` (a rank's tensors by full name) that the
    kernel covers, if it runs on `device`. Returns the number of layers packed."""
    layers = [name[: -len(".weight_scale")] for name, t in weights.items()
              if name.endswith(".weight_scale") and t.dim() == 2 and not stack_depth(name)]  # not expert stacks
    if not layers or not available(device):
        return 0
    count = 0
    for p in layers:
        w = {t: weights[f"{p}.{t}"] for t in INT4_TENSORS if f"{p}.{t}" in weights}
        if pack_layer(w, dtype):
            weights.update({f"{p}.{t}": w[t] for t in PACKED_TENSORS if t in w})
            count += 1
    return count
