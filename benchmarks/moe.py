"""The fused MoE kernels (trtc/plugins/moe/triton.py) against the per-expert loop through cuBLAS
(HF transformers' eager experts: for each chosen expert, F.linear gate_up, SiLU * up, F.linear down,
weighted index_add), on one GPU, at Qwen3-30B-A3B's and Mixtral-8x7B's MoE shapes.

    python benchmarks/moe.py [--tokens 1,4,16,64,256,1024] [--fp8]

Random router logits (every token's top-k spread over the experts), random weights. The fused
kernels are timed back to back in a CUDA graph, each call on its own copy of the experts when they
fit (so nothing comes from L2) (trtc/utils/gpu_timing.py); the loop, which syncs on the host to
find the chosen experts, eagerly. Bandwidth counts the bytes of the experts actually chosen (each
read once), the measure of a decode step: MBU = that / time / the GPU's copy bandwidth.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from trtc.formats.quant_layout import quantize_fp8
from trtc.plugins.moe.reference import route
from trtc.plugins.moe.triton import fused_moe
from trtc.tools.bench import measure_bandwidth
from trtc.utils.gpu_timing import timed

# name -> (experts E, top-k, hidden H, expert intermediate I)
SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}


def random_experts(e: int, hidden: int, inter: int, fp8: bool, dev: torch.device, g: torch.Generator) -> dict:
    gate_up = torch.randn(e, 2 * inter, hidden, device=dev, dtype=torch.bfloat16, generator=g) / hidden**0.5
    down = torch.randn(e, hidden, inter, device=dev, dtype=torch.bfloat16, generator=g) / inter**0.5
    if not fp8:
        return {"gate_up.weight": gate_up, "down.weight": down}
    s = torch.full((e,), 0.002, device=dev)
    return {"gate_up.weight": quantize_fp8(gate_up, s[:, None, None]), "gate_up.weight_scale": s[:, None].expand(e, 2 * inter).contiguous(),
            "gate_up.input_scale": torch.full((e,), 0.02, device=dev),
            "down.weight": quantize_fp8(down, s[:, None, None]), "down.weight_scale": s.clone(),
            "down.input_scale": torch.full((e,), 0.02, device=dev)}


def loop_moe(x: torch.Tensor, experts: dict, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """HF's eager experts loop, through cuBLAS (bf16 weights)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    gate_up, down = experts["gate_up.weight"], experts["down.weight"]
    for e in torch.unique(ids).tolist():
        token, slot = torch.where(ids == e)
        gate, up = F.linear(x[token], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e])
        out.index_add_(0, token, y.float() * weights[token, slot, None])
    return out.to(x.dtype)


def active_bytes(ids: torch.Tensor, experts: dict) -> int:
    chosen = torch.unique(ids).numel()
    return chosen * sum(experts[n][0].numel() * experts[n].element_size() for n in ("gate_up.weight", "down.weight"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,4,16,64,256,1024")
    ap.add_argument("--fp8", action="store_true", help="FP8 experts for the fused kernels (the loop stays bf16)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    copy_bs = measure_bandwidth(dev)
    print(f"device copy bandwidth {copy_bs / 1e12:.2f} TB/s")
    g = torch.Generator(device=dev).manual_seed(0)
    for name, (e, k, hidden, inter) in SHAPES.items():
        bf16 = random_experts(e, hidden, inter, False, dev, g)
        fused_w = random_experts(e, hidden, inter, True, dev, g) if args.fp8 else bf16
        size = sum(t.numel() * t.element_size() for t in fused_w.values())
        copies = [fused_w] + [{n: t.clone() for n, t in fused_w.items()} for _ in range(min(3, int(20e9 // size)))]
        print(f"\n{name}: E {e}, top-{k}, hidden {hidden}, I {inter}, experts {'fp8' if args.fp8 else 'bf16'}")
        print(f"{'T':>6} {'active':>7} {'loop us':>9} {'fused us':>9} {'speed-up':>8} {'GB/s':>7} {'MBU':>6}")
        for t in (int(s) for s in args.tokens.split(",")):
            x = torch.randn(t, hidden, device=dev, dtype=torch.bfloat16, generator=g)
            weights, ids = route(torch.randn(t, e, device=dev, generator=g), k, normalize=True)
            fused_us, _ = timed([lambda c=c: fused_moe(x, c, weights, ids) for c in copies])  # per call
            loop_us, _ = timed([lambda: loop_moe(x, bf16, weights, ids)], graph=False)
            nbytes = active_bytes(ids, fused_w)
            gbs = nbytes / fused_us / 1e3
            print(f"{t:>6} {torch.unique(ids).numel():>7} {loop_us:>9.1f} {fused_us:>9.1f} {loop_us / fused_us:>7.2f}x "
                  f"{gbs:>7.0f} {gbs * 1e9 / copy_bs:>6.1%}")


if __name__ == "__main__":
    main()
