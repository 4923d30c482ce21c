"""W4A16 and FP8 GEMMs against the bf16 cuBLAS GEMM on Llama-3.1-8B's linear shapes (one GPU).

    python benchmarks/quant_gemm.py [--m 1,2,4,8,16,32,64]

For each shape (N x K: qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336) and rows M,
times cuBLAS bf16 (`F.linear`), trtc's W4A16 kernels (AWQ layout, group 128, with the pre-quant
scale; CUDA C++ up to 64 rows, Triton, dequantize + cuBLAS), FP8 W8A8 (the better of trtc's Triton
kernel and cuBLASLt `_scaled_mm`, per-channel weight scales), each with the best of the candidates the build's autotuner tries (compiler/autotune.py),
all timed the same way: back to back in a CUDA graph, each call on its own copy of the weights
(so nothing comes from L2), as in the decode graph (trtc/utils/gpu_timing.py). Prints per-shape speed-ups,
the achieved bandwidth of the W4A16 kernel against the GPU's measured copy bandwidth, and the
speed-up of one decoder layer's four GEMMs together.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from trtc.compiler.autotune import cold_copies, fastest
from trtc.formats.quant_layout import quantize_fp8
from trtc.plugins.gemm.tactics import gemm_key
from trtc.plugins.gemm.triton_quant import split_k_locks
from trtc.plugins.gemm.w4a16_packed import available, pack_layer
from trtc.tools.bench import measure_bandwidth
from trtc.utils.gpu_timing import timed

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def int4_layer(n: int, k: int, g: torch.Generator, dev: torch.device) -> dict[str, torch.Tensor]:
    """A random AWQ layer (group 128, pre-quant scale) with the CUDA kernel's layout beside it, as the
    runtime adds it at load."""
    w = {"weight": torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8, generator=g),
         "weight_scale": torch.rand(n, k // 128, device=dev, generator=g) * 0.01 + 0.001,
         "pre_quant_scale": torch.rand(k, device=dev, generator=g) + 0.5}
    assert pack_layer(w, torch.bfloat16)
    return w


def int4_bytes(n: int, k: int) -> float:
    """What the W4A16 GEMM of an N x K layer must read: its 4-bit weights and fp32 group-128 scales."""
    return n * k * (0.5 + 4 / 128)


def best(key: str, m: int, k: int, x: torch.Tensor, copies: list[dict]) -> tuple[float, str]:
    us, t = fastest(key, m, k, x, copies, torch.bfloat16, log=lambda *_: None)
    if t.impl == "cuda":
        return us, f"cuda/n{t.block_n}"
    return us, (t.impl if t.impl != "triton" else f"{t.block_m}x{t.block_n}x{t.block_k}/s{t.split_k}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,2,4,8,16,32,64")
    args = ap.parse_args()
    dev = torch.device("cuda")
    split_k_locks(dev)
    bw = measure_bandwidth(dev)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:,.0f} GB/s; CUDA W4A16 kernel: "
          f"{'compiled' if available(dev) else 'UNAVAILABLE'}")
    g = torch.Generator(device=dev).manual_seed(0)
    weights = {}
    for name, (n, k) in SHAPES.items():
        bf16 = torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) * 0.02
        w4 = int4_layer(n, k, g, dev)
        f8 = {"weight": (torch.randn(n, k, device=dev, generator=g) * 30).to(torch.float8_e4m3fn),
              "weight_scale": torch.rand(n, device=dev, generator=g) * 0.001, "input_scale": torch.tensor(0.02, device=dev)}
        weights[name] = (cold_copies({"w": bf16}), cold_copies(w4), cold_copies(f8))
    print(f"{'M':>3} {'shape':<8} {'bf16 us':>8} {'w4a16 us':>9} {'x':>6} {'w4 GB/s':>8} {'tactic':<16}"
          f" {'fp8 us':>7} {'x':>6} {'tactic':<16}")
    summary = []
    for m in map(int, args.m.split(",")):
        tot = [0.0, 0.0, 0.0]
        for name, (n, k) in SHAPES.items():
            bf16, w4, f8 = weights[name]
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
            t_bf16 = timed([lambda w=w: F.linear(x, w["w"]) for w in bf16], reps=5)[0]
            t_w4, d_w4 = best(gemm_key(w4[0]["weight"], w4[0]["weight_scale"]), m, k, x, w4)
            xq = quantize_fp8(x, f8[0]["input_scale"])
            t_f8, d_f8 = best(gemm_key(f8[0]["weight"], f8[0]["weight_scale"]), m, k, xq, f8)
            w4_bytes = n * k / 2 + n * k / 128 * 2 + m * (k + n) * 2
            print(f"{m:>3} {name:<8} {t_bf16:>8.1f} {t_w4:>9.1f} {t_bf16 / t_w4:>5.2f}x "
                  f"{w4_bytes / (t_w4 / 1e6) / 1e9:>8,.0f} {d_w4:<16} {t_f8:>7.1f} {t_bf16 / t_f8:>5.2f}x {d_f8:<16}",
                  flush=True)
            tot = [tot[0] + t_bf16, tot[1] + t_w4, tot[2] + t_f8]
        summary.append((m, *tot))
    print(f"\none decoder layer's four GEMMs (bandwidth limit at {bw / 1e9:,.0f} GB/s: bf16 "
          f"{sum(2 * n * k for n, k in SHAPES.values()) / bw * 1e6:.1f} us, w4a16 "
          f"{sum(int4_bytes(n, k) for n, k in SHAPES.values()) / bw * 1e6:.1f} us, fp8 "
          f"{sum(n * k for n, k in SHAPES.values()) / bw * 1e6:.1f} us)")
    print(f"{'M':>3} {'bf16 us':>8} {'w4a16 us':>9} {'w4a16 x':>8} {'fp8 us':>7} {'fp8 x':>6}")
    for m, b, w, f in summary:
        print(f"{m:>3} {b:>8.1f} {w:>9.1f} {b / w:>7.2f}x {f:>7.1f} {b / f:>5.2f}x")


if __name__ == "__main__":
    main()
