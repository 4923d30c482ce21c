"""Build-time autotuning: time each candidate tactic once on the build GPU, keep the fastest.

For every quantized GEMM shape of the engine (trtc/plugins/gemm/tactics.py: kind, N, K, group) and
every tuned row bucket M up to --max_num_tokens, the candidates (trtc's CUDA C++ W4A16 kernels up to
64 rows where the layer is packed for them, else its Triton kernel with its launch configurations;
dequantize + cuBLAS past 16 rows; past 64 rows the tensor-core W4A16 GEMM with in-register dequantization
in a few tile shapes, against dequantize + cuBLAS; cuBLASLt `_scaled_mm` for FP8) run on
the engine's own weights of the first layer that has the shape, timed as they run in decode: back to back in one CUDA graph, each call reading
a different copy of the weights so that none comes from L2 (trtc/utils/gpu_timing.py). Decode attention is tuned
per CUDA-graph batch size at a context of min(max_seq_len, 2048) tokens (`triton.testing.do_bench`). The winners go to
config.json "tactics"; a CPU build has none (the references have nothing to choose).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch

from trtc.formats.build_config import BuildConfig, kv_cache_torch_dtype
from trtc.formats.checkpoint import rank_file
from trtc.formats.engine_layout import stack_depth
from trtc.formats.graph import ModelGraph
from trtc.formats.mapping import Mapping
from trtc.formats.quant_layout import quantize_fp8
from trtc.plugins.gemm.tactics import TUNED_BUCKETS, Tactic, fit_stages, gemm_key, key_group, to_config
from trtc.plugins.gemm.w4a16_packed import (
    BLOCK_GROUPS,
    MAX_M,
    available,
    block_n,
    pack_layer,
)
from trtc.utils.gpu_timing import copies_past_l2, timed

# W4A16 past 64 rows: tiles of w4a16_tc.gemm (BLOCK_M x BLOCK_N x BLOCK_K, warps, stages, swap_ab). Their
# dequantization issues about as many instructions as the tensor cores take cycles for 128 rows of x
# (SASS for sm_90: ~234 a K step of 128x128x64 at 8 warps), so 256-row tiles halve its share; 64-column
# tiles and split-K give small-N layers (o, down) enough programs at a few hundred rows
TC_CANDIDATES = [
    Tactic("triton_tc", block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=w, num_stages=st, swap_ab=swap)
    for bm, bn, bk, split, w, st, swap in [
        (64, 128, 64, 1, 4, 4, False), (128, 64, 64, 1, 4, 4, False), (128, 128, 64, 1, 8, 4, False),
        (128, 128, 64, 1, 8, 4, True), (128, 256, 64, 1, 8, 3, False), (256, 64, 64, 1, 4, 4, False),
        (256, 128, 64, 1, 8, 4, False), (128, 64, 64, 2, 4, 4, False), (256, 64, 64, 2, 8, 4, False),
    ]
]


def gemm_candidates(key: str, m: int, k: int, packed: bool = False) -> list[Tactic]:
    """packed: the INT4 layer has the CUDA kernel's layout (w4a16_packed.py)."""
    fp8 = key.startswith("fp8")
    group = key_group(key)
    out = [Tactic("scaled_mm")] if fp8 else [Tactic("dequant_mm")] if m > 16 else []
    if packed and m <= MAX_M:  # trtc's CUDA kernels alone: they beat every Triton candidate on the 8B
        return out + [Tactic("cuda", block_n=block_n(m, r)) for r in BLOCK_GROUPS]  # shapes at M = 1, 16, 64
    if not fp8 and m > 64:  # compute-bound: the tensor-core GEMMs (w4a16_tc.py) against dequantize + cuBLAS
        return out + [fit_stages(t, group) for t in TC_CANDIDATES if t.block_m <= max(64, 1 << (m - 1).bit_length())
                      and k // t.split_k >= 4 * t.block_k]
    if m <= 64:
        block_ms = [max(16, m)]
        block_ns, splits, block_ks = [32, 64, 128] if fp8 else [64, 128], [1, 2, 4, 8], [128, 256]
    else:
        block_ms = [64, 128]
        block_ns, splits, block_ks = [64, 128], [1], [128]
    for bm, bn, bk, split in itertools.product(block_ms, block_ns, block_ks, splits):
        if (split > 1 and k // split < 2 * bk) or (group and bk > group and bk % group):
            continue
        warps = 8 if bm * bn >= 128 * 128 else 4
        out.append(Tactic("triton", block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=warps, num_stages=3))
    if m > 64:  # cuBLAS(Lt) is the one to beat there: few Triton shapes
        out = out[:3]
    return out


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20, return_mode="median")


def cold_copies(w: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """w and clones of it, together four times the L2 cache (at most 16 sets)."""
    nbytes = sum(t.numel() * t.element_size() for t in w.values())
    return [w] + [{k: v.clone() for k, v in w.items()} for _ in range(copies_past_l2(nbytes, cap=16) - 1)]


def fastest(key: str, m: int, k: int, x: torch.Tensor, copies: list[dict[str, torch.Tensor]], dtype: torch.dtype,
            log=print) -> tuple[float, Tactic]:
    """The fastest of the candidates for x [M, K] (quantized for an FP8 layer) over the weight copies,
    and its microseconds per call. A candidate this GPU cannot run (shared memory) is skipped."""
    from trtc.plugins.gemm.linear import run_tactic

    timings = []
    for t in gemm_candidates(key, m, k, packed="packed_weight" in copies[0]):
        try:
            us, _ = timed([lambda c=c, t=t: run_tactic(t, x, c, dtype) for c in copies], reps=5, eager_fallback=False)
            timings.append((us, t))
        except Exception as e:  # noqa: BLE001
            log(f"  {key} M={m}: {t} skipped ({type(e).__name__})")
    return min(timings, key=lambda p: p[0])


def tune_gemms(engine_dir: Path, max_num_tokens: int, dtype: torch.dtype, log=print) -> dict:
    from safetensors import safe_open

    from trtc.plugins.gemm.linear import QUANT_TENSORS
    from trtc.plugins.gemm.triton_quant import split_k_locks

    device = torch.device("cuda")
    locks = split_k_locks(device)  # noqa: F841 - held while tuning
    shapes: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(rank_file(engine_dir, 0, "engine")), framework="pt", device="cuda") as f:
        names = set(f.keys())
        for name in sorted(names):
            if not name.endswith(".weight_scale") or stack_depth(name):  # expert stacks run the MoE kernels
                continue
            base = name[: -len(".weight_scale")]
            key = gemm_key(f.get_slice(base + ".weight"), f.get_slice(name))
            if key not in shapes:
                shapes[key] = {t: f.get_tensor(f"{base}.{t}") for t in QUANT_TENSORS if f"{base}.{t}" in names}
    tuned: dict[str, dict[int, Tactic]] = {}
    packs = available(device)
    for key, w in shapes.items():
        if packs and key.startswith("w4a16"):
            pack_layer(w, dtype)  # as the runtime does at load
        copies = cold_copies(w)
        fp8 = key.startswith("fp8")
        k = w["weight"].shape[1] * (1 if fp8 else 2)
        tuned[key] = {}
        start = time.perf_counter()
        buckets = [b for b in TUNED_BUCKETS if b < max_num_tokens]
        buckets.append(min(b for b in TUNED_BUCKETS if b >= max_num_tokens))
        for m in buckets:
            x = torch.randn(m, k, device=device, dtype=dtype)
            if fp8:
                x = quantize_fp8(x, w["input_scale"])
            tuned[key][m] = fastest(key, m, k, x, copies, dtype, log)[1]
        del copies
        log(f"tuned {key}: {len(tuned[key])} row buckets in {time.perf_counter() - start:.1f} s")
    return to_config(tuned)


def tune_decode_attention(graph: ModelGraph, mapping: Mapping, config: BuildConfig, dtype: torch.dtype) -> dict:
    """{key: {batch: {"block_n": .., "num_warps": ..}}} for the decode attention kernel."""
    from trtc.plugins.attention import decode_tactic_key
    from trtc.plugins.attention.triton_decode import decode_attention

    a = graph.layers[0].attention
    hq, hkv = mapping.local_heads(a), mapping.local_kv_heads(a)
    kv_dtype = kv_cache_torch_dtype(config.kv_cache_dtype) or dtype
    tpb = config.tokens_per_block
    key = decode_tactic_key(hq, hkv, a.head_dim, kv_dtype)
    out: dict[str, dict] = {}
    sizes = sorted(config.cuda_graph_batch_sizes)
    # powers of two and the largest (a batch takes the tactic of the smallest tuned size >= it), over
    # at most 2**20 cached tokens (a 2048-row batch of 2048-token contexts would take 17 GB)
    for bs in [b for b in sizes if b & (b - 1) == 0 or b == sizes[-1]]:
        ctx = min(config.max_seq_len, 2048, max(tpb, 2**20 // bs))
        blocks_per_seq = -(-ctx // tpb)
        num_blocks = bs * blocks_per_seq
        k_cache = torch.randn(num_blocks, tpb, hkv, a.head_dim, device="cuda", dtype=dtype).to(kv_dtype)
        v_cache = torch.randn_like(k_cache, dtype=dtype).to(kv_dtype)
        scales = (torch.tensor(1.0, device="cuda"),) * 2 if kv_dtype == torch.float8_e4m3fn else (None, None)
        q = torch.randn(bs, hq, a.head_dim, device="cuda", dtype=dtype)
        tables = torch.arange(num_blocks, device="cuda", dtype=torch.int32).view(bs, blocks_per_seq)
        lens = torch.full((bs,), ctx, device="cuda", dtype=torch.int32)
        best = min(
            ((_bench(lambda: decode_attention(q, k_cache, v_cache, tables, lens, a.softmax_scale, block_n=bn,
                                              num_warps=nw, k_scale=scales[0], v_scale=scales[1])), bn, nw)
             for bn, nw in itertools.product((32, 64), (4, 8))),
            key=lambda p: p[0],
        )
        out[str(bs)] = {"block_n": best[1], "num_warps": best[2]}
    return {key: out}


def autotune(engine_dir: Path, graph: ModelGraph, mapping: Mapping, config: BuildConfig, dtype: torch.dtype,
             target: dict, log=print) -> dict:
    """config.json "tactics" for an engine directory whose rank files are written."""
    if target.get("device") != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return {}
    start = time.perf_counter()
    tactics = {"gemm": tune_gemms(engine_dir, config.max_num_tokens, dtype, log),
               "decode_attention": tune_decode_attention(graph, mapping, config, dtype)}
    tactics["tuning_seconds"] = round(time.perf_counter() - start, 1)
    torch.cuda.empty_cache()
    return tactics
