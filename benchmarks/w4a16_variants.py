"""trtc's CUDA W4A16 kernel compiled with other block shapes, on Llama-3.1-8B's linear shapes (one GPU).

    python benchmarks/w4a16_variants.py [--m 1,4,16,32,64] [--variants 8x8,8x4,4x8,4x16]

A variant WxC is a block of W warps, each with C chunks of 64 columns of weights in flight (the
kernel's W4A16_WARPS and W4A16_RING_CHUNKS; the build uses w4a16_packed.WARPS x RING_CHUNKS). Each
variant is first checked against the float32 reference (AWQ layout, group 128, pre-quant scale; max
error <= 1e-2 of max|ref|), then timed as the autotuner times tactics: back to back in a CUDA
graph, each call on its own copy of the weights (trtc/utils/gpu_timing.py), the best of the
n-groups per block (w4a16_packed.BLOCK_GROUPS) for each shape. Prints one decoder layer's four GEMMs
per variant and M, against cuBLAS bf16 in the same run and the bandwidth limit.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from quant_gemm import SHAPES, int4_bytes, int4_layer  # benchmarks/quant_gemm.py: Llama-3.1-8B's linear shapes

from trtc.compiler.autotune import cold_copies
from trtc.plugins.gemm import w4a16_packed
from trtc.plugins.gemm.w4a16 import w4a16_linear
from trtc.tools.bench import measure_bandwidth
from trtc.utils.gpu_timing import timed


def check(warps: int, ring: int, dev: torch.device, g: torch.Generator) -> float:
    """Worst max|y - ref| / max|ref| over M in 1, 17, 64 and every n-group count, on a 1024 x 4096 layer."""
    w = int4_layer(1024, 4096, g, dev)
    worst = 0.0
    for m in (1, 17, 64):
        x = torch.randn(m, 4096, device=dev, dtype=torch.bfloat16, generator=g)
        ref = w4a16_linear(x.float(), w["weight"], w["weight_scale"], None, w["pre_quant_scale"].to(torch.bfloat16).float())
        for r in w4a16_packed.BLOCK_GROUPS:
            y = w4a16_packed.gemm(x, w, None, w4a16_packed.block_n(m, r), warps, ring)
            worst = max(worst, ((y.float() - ref).abs().max() / ref.abs().max()).item())
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,4,16,32,64")
    ap.add_argument("--variants", default="8x8,8x4,4x8,4x16")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = measure_bandwidth(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    layers = {name: (cold_copies({"w": torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) * 0.02}),
                     cold_copies(int4_layer(n, k, g, dev))) for name, (n, k) in SHAPES.items()}
    ms = [int(m) for m in args.m.split(",")]
    limit = sum(int4_bytes(n, k) for n, k in SHAPES.values()) / bw * 1e6
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e9:,.0f} GB/s; one layer's W4A16 bytes at that rate: {limit:.1f} us")
    bf16 = {}
    for m in ms:
        x = torch.randn(m, 4096, device=dev, dtype=torch.bfloat16, generator=g)
        x_down = torch.randn(m, 14336, device=dev, dtype=torch.bfloat16, generator=g)
        bf16[m] = sum(timed([lambda c=c, xx=(x_down if name == "down" else x): F.linear(xx, c["w"]) for c in layers[name][0]],
                            reps=5)[0] for name in SHAPES)
    rows = []
    for variant in args.variants.split(","):
        warps, ring = map(int, variant.split("x"))
        err = check(warps, ring, dev, g)
        per_m, detail = [], []
        for m in ms:
            total = 0.0
            for name, (n, k) in SHAPES.items():
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
                best = min((timed([lambda c=c, r=r: w4a16_packed.gemm(x, c, None, w4a16_packed.block_n(m, r), warps, ring)
                                   for c in layers[name][1]], reps=5)[0], r) for r in w4a16_packed.BLOCK_GROUPS)
                total += best[0]
                detail.append(f"M={m} {name} {best[0]:.1f}us R={best[1]} "
                              f"{int4_bytes(n, k) / (best[0] / 1e6) / 1e9:,.0f}GB/s")
            per_m.append(total)
        print(f"{variant}: max err {err:.2e}; " + "; ".join(detail), flush=True)
        rows.append((variant, err, per_m))
    print(f"\none decoder layer's four W4A16 GEMMs, us (x: cuBLAS bf16 in this run / it; limit {limit:.1f} us)")
    print(f"{'variant':>8} {'err':>8} " + " ".join(f"{'M=' + str(m):>14}" for m in ms))
    print(f"{'bf16':>8} {'':>8} " + " ".join(f"{bf16[m]:>14.1f}" for m in ms))
    for variant, err, per_m in rows:
        print(f"{variant:>8} {err:>8.1e} " + " ".join(f"{t:>7.1f} {bf16[m] / t:>5.2f}x" for m, t in zip(ms, per_m)))


if __name__ == "__main__":
    main()
