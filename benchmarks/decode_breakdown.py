"""Where a batch-1 decode step's time goes, measured on the GPU:

    python benchmarks/decode_breakdown.py --engine_dir ENGINE

* GEMMs alone: every weight matrix of the model multiplied by one token's activations (cuBLAS
  through torch), captured in one CUDA graph: the floor set by the GEMM library at batch 1;
* the decode graph alone: one captured decode step of the engine (all kernels, no host work);
* the full step: TPOT of `trtc bench --latency` (graph + scheduling + sampling + host sync);
* the bandwidth floor: bytes read per step / measured copy bandwidth.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from trtc.runtime.executor import Executor
from trtc.tools.bench import bench, measure_bandwidth


def graph_ms(fn, reps: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return replay_ms(g, reps)


def replay_ms(g: torch.cuda.CUDAGraph, reps: int = 50) -> float:
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine_dir", required=True)
    args = ap.parse_args()
    ex = Executor(args.engine_dir)
    lat = bench(ex, 128, 256, latency=True, batch_size=1)
    w = ex.runner.w
    mats = [t for name, t in w.items() if t.dim() == 2 and name != "embedding.weight"]
    if ex.engine.graph.tie_word_embeddings:
        mats.append(w["embedding.weight"])
    xs = [torch.randn(1, m.shape[1], dtype=m.dtype, device="cuda") for m in mats]
    gemm_ms = graph_ms(lambda: [F.linear(x, m) for x, m in zip(xs, mats)])
    step_ms = replay_ms(ex.worker.cuda_graphs.graphs[1])
    bw = measure_bandwidth(torch.device("cuda"))
    weight_bytes = sum(m.numel() * m.element_size() for m in mats)
    print(f"{'batch-1 decode step':<40}{'ms':>8}{'% of floor':>12}")
    floor = lat.bytes_per_step / bw * 1e3
    for name, ms in [
        ("bandwidth floor (bytes / copy bw)", floor),
        ("GEMMs alone (cuBLAS, one graph)", gemm_ms),
        ("decode graph replay (all kernels)", step_ms),
        ("full step (TPOT, with host work)", lat.tpot_ms["mean"]),
    ]:
        print(f"{name:<40}{ms:>8.3f}{100 * floor / ms:>11.1f}%")
    print(f"weights in GEMMs {weight_bytes / 1e9:.2f} GB; GEMM-only bandwidth {weight_bytes / gemm_ms / 1e6:,.0f} GB/s; "
          f"copy bandwidth {bw / 1e9:,.0f} GB/s")
    ex.close()


if __name__ == "__main__":
    main()
