"""W4A16 (INT4-AWQ) tactics at every batch against the bf16 cuBLAS GEMM, FP8 beside them, and the FP8
activation quantization fused into the norm and SwiGLU kernels, on Llama-3.1-8B's shapes (one GPU, < 3 min).

    python benchmarks/w4a16_large_m.py [--m 1,16,64,128,256,512,1024,2048,4096] [--each]

GEMMs (N x K: qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336), AWQ layout (group 128,
zero points, pre_quant_scale), timed as the build's autotuner times tactics (compiler/autotune.py):
back to back in one CUDA graph, each call on its own copy of the weights, so none comes from L2
(trtc/utils/gpu_timing.py). Every candidate the build would try at that M runs (trtc's CUDA kernel
up to 64 rows; past 64 rows the tensor-core GEMM with in-register dequantization, w4a16_tc.gemm, in
its tile shapes, and dequantize + cuBLAS), plus the tensor-core GEMM's 64-row tiles from 16 rows on.
Columns: TFLOP/s (2 M N K / time) and the ratio to bf16 for bf16, the best of each W4A16 impl, the
best W4A16 tactic, the tactic an untuned engine takes (tactics.default_tactic), and FP8 (cuBLASLt
`_scaled_mm`, per-channel weight scales; the Triton FP8 kernel too up to 16 rows). --each prints every
candidate. Then one decoder layer's four GEMMs per M, and the fused FP8 epilogues:
fused_add_rms_norm -> fp8 and silu_and_mul -> fp8 against the bf16 kernel + quantize_activation.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from trtc.compiler.autotune import TC_CANDIDATES, cold_copies, gemm_candidates
from trtc.formats.quant_layout import quantize_fp8
from trtc.plugins.gemm.linear import run_tactic
from trtc.plugins.gemm.tactics import Tactic, default_tactic, gemm_key
from trtc.plugins.gemm.triton_quant import split_k_locks
from trtc.plugins.gemm.w4a16_packed import available, pack_layer
from trtc.utils.gpu_timing import copies_past_l2, timed

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
HIDDEN, INTER = 4096, 14336


def awq_layer(n: int, k: int, g: torch.Generator, dev: torch.device, packed: bool) -> dict[str, torch.Tensor]:
    w = {"weight": torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8, generator=g),
         "weight_scale": torch.rand(n, k // 128, device=dev, generator=g) * 0.01 + 0.001,
         "weight_zero": torch.randint(0, 16, (n, k // 128), device=dev, dtype=torch.uint8, generator=g),
         "pre_quant_scale": torch.rand(k, device=dev, generator=g) + 0.5}
    if packed:
        assert pack_layer(w, torch.bfloat16)
    return w


def name(t: Tactic) -> str:
    if t.impl == "cuda":
        return f"cuda/n{t.block_n}"
    if t.impl == "triton":
        return f"triton {t.block_m}x{t.block_n}x{t.block_k}/s{t.split_k}"
    if t.impl == "triton_tc":
        return (f"tc {t.block_m}x{t.block_n}x{t.block_k}/w{t.num_warps}s{t.num_stages}"
                f"{f'/k{t.split_k}' if t.split_k > 1 else ''}{'/swap' if t.swap_ab else ''}")
    return t.impl


def time_tactics(tactics: list[Tactic], x: torch.Tensor, copies: list[dict], log) -> list[tuple[float, Tactic]]:
    out = []
    for t in tactics:
        try:
            out.append((timed([lambda c=c, t=t: run_tactic(t, x, c, torch.bfloat16) for c in copies], reps=5,
                              eager_fallback=False)[0], t))
        except Exception as e:  # noqa: BLE001 - a tile this GPU cannot run (shared memory) is skipped
            log(f"  {name(t)} skipped ({type(e).__name__}: {str(e)[:60]})")
    return out


def gemm_table(ms: list[int], each: bool, dev: torch.device, g: torch.Generator) -> None:
    packed = available(dev)
    layers = {}
    for shape, (n, k) in SHAPES.items():
        bf16 = torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) * 0.02
        f8 = {"weight": (torch.randn(n, k, device=dev, generator=g) * 30).to(torch.float8_e4m3fn),
              "weight_scale": torch.rand(n, device=dev, generator=g) * 0.001, "input_scale": torch.tensor(0.02, device=dev)}
        layers[shape] = (cold_copies({"w": bf16}), cold_copies(awq_layer(n, k, g, dev, packed)), cold_copies(f8))
    print(f"\nGEMMs, TFLOP/s and x bf16 (CUDA W4A16 kernel {'compiled' if packed else 'UNAVAILABLE'})")
    head = (f"{'M':>5} {'shape':<8} {'bf16':>6} | {'cuda':>11} {'dequant_mm':>11} {'triton_tc':>11} | "
            f"{'best w4a16':>11} {'tactic':<28} {'untuned':>11} | {'fp8':>11} {'fp8 tactic':<10}")
    print(head + "\n" + "-" * len(head))
    layer = {}
    for m in ms:
        tot = {"bf16": 0.0, "w4": 0.0, "untuned": 0.0, "fp8": 0.0}
        for shape, (n, k) in SHAPES.items():
            bf16, w4, f8 = layers[shape]
            flops = 2 * m * n * k
            tf = lambda us, flops=flops: flops / us / 1e6  # noqa: E731  TFLOP/s
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
            t_bf16 = timed([lambda c=c: F.linear(x, c["w"]) for c in bf16], reps=5)[0]
            key = gemm_key(w4[0]["weight"], w4[0]["weight_scale"])
            cands = gemm_candidates(key, m, k, packed=packed)
            if 16 <= m <= 64:
                cands += [t for t in TC_CANDIDATES if t.block_m == 64]
            untuned = default_tactic(key, m, packed=packed)
            if untuned not in cands:
                cands.append(untuned)
            res = time_tactics(cands, x, w4, print)
            by_impl = {impl: min((r for r in res if r[1].impl == impl), default=None, key=lambda r: r[0])
                       for impl in ("cuda", "dequant_mm", "triton_tc")}
            nan = (float("nan"), Tactic("none"))  # every candidate failed (printed above)
            best = min(res, key=lambda r: r[0], default=nan)
            t_untuned = next((us for us, t in res if t == untuned), nan[0])
            xq = quantize_fp8(x, f8[0]["input_scale"])
            f8_cands = [Tactic("scaled_mm")] + ([default_tactic("fp8", m)] if m <= 16 else [])
            f8_best = min(time_tactics(f8_cands, xq, f8, print), key=lambda r: r[0], default=nan)

            def col(us):
                if us is None:
                    return f"{'-':>11}"
                return f"{tf(us):>5.{0 if tf(us) >= 100 else 1}f} {t_bf16 / us:>4.2f}x"

            print(f"{m:>5} {shape:<8} {tf(t_bf16):>6.1f} | " + " ".join(col(r and r[0]) for r in by_impl.values())
                  + f" | {col(best[0])} {name(best[1]):<28} {col(t_untuned)} | {col(f8_best[0])} {name(f8_best[1]):<10}",
                  flush=True)
            if each:
                for us, t in sorted(res, key=lambda r: r[0]):
                    print(f"{'':>15} {name(t):<34} {us:>9.1f} us {tf(us):>6.0f} TFLOP/s {t_bf16 / us:>5.2f}x")
            for kk, us in (("bf16", t_bf16), ("w4", best[0]), ("untuned", t_untuned), ("fp8", f8_best[0])):
                tot[kk] += us
        layer[m] = tot
    print("\none decoder layer's four GEMMs, us (x: bf16 / it)")
    print(f"{'M':>5} {'bf16':>9} {'w4a16 best':>17} {'w4a16 untuned':>17} {'fp8':>17}")
    for m, t in layer.items():
        print(f"{m:>5} {t['bf16']:>9.1f} " + " ".join(f"{t[kk]:>10.1f} {t['bf16'] / t[kk]:>5.2f}x"
                                                     for kk in ("w4", "untuned", "fp8")))


def epilogue_table(ts: list[int], dev: torch.device, g: torch.Generator) -> None:
    """The FP8 quantization in the norm / SwiGLU kernel against the bf16 kernel then quantize_activation."""
    from trtc.plugins.activation.triton import silu_and_mul
    from trtc.plugins.gemm.act_quant import quantize_activation
    from trtc.plugins.norm.triton import fused_add_rms_norm

    scale = torch.tensor(0.02, device=dev)
    w = torch.rand(HIDDEN, device=dev, generator=g).to(torch.bfloat16) + 0.5
    print("\nFP8 activations: fused into the kernel before the GEMM vs a separate quantize pass, us")
    print(f"{'T':>5} {'norm->fp8':>10} {'norm+quant':>11} {'x':>6} {'silu->fp8':>10} {'silu+quant':>11} {'x':>6}")
    for t in ts:
        n_in = copies_past_l2(t * (HIDDEN * 4 + INTER * 4), cap=8)
        xs = [(torch.randn(t, HIDDEN, device=dev, generator=g).to(torch.bfloat16),
               torch.randn(t, HIDDEN, device=dev, generator=g).to(torch.bfloat16),
               torch.randn(t, 2 * INTER, device=dev, generator=g).to(torch.bfloat16)) for _ in range(n_in)]
        norm_fused = timed([lambda a=a: fused_add_rms_norm(a[0], a[1], w, 1e-5, 0.0, scale) for a in xs])[0]
        norm_split = timed([lambda a=a: quantize_activation(fused_add_rms_norm(a[0], a[1], w, 1e-5)[0], scale)
                            for a in xs])[0]
        act_fused = timed([lambda a=a: silu_and_mul(a[2], scale) for a in xs])[0]
        act_split = timed([lambda a=a: quantize_activation(silu_and_mul(a[2]), scale) for a in xs])[0]
        print(f"{t:>5} {norm_fused:>10.1f} {norm_split:>11.1f} {norm_split / norm_fused:>5.2f}x "
              f"{act_fused:>10.1f} {act_split:>11.1f} {act_split / act_fused:>5.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,16,64,128,256,512,1024,2048,4096")
    ap.add_argument("--each", action="store_true", help="print every candidate's time")
    args = ap.parse_args()
    start = time.perf_counter()
    dev = torch.device("cuda")
    split_k_locks(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    ms = [int(m) for m in args.m.split(",")]
    gemm_table(ms, args.each, dev, g)
    epilogue_table([t for t in (1, 256, 2048, 4096) if t <= max(ms)] or [1], dev, g)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
