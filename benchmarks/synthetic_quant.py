"""A quantized trtc checkpoint of any shape, for speed measurements only: round-to-nearest
quantization of a converted checkpoint's weights into trtc's quantized layout
(trtc/formats/quant_layout.py), with activation and KV-cache scales set from the weights' scale
instead of calibration. Kernels read the same bytes whatever the values, so an 8B engine built
from it runs at the speed of a calibrated one; its outputs mean nothing. Accuracy is measured on
engines from `trtc quantize` (ModelOpt calibration): tests/test_gpu_quantized.py,
benchmarks/quant_accuracy.py.

    python benchmarks/synthetic_quant.py CKPT_IN CKPT_OUT fp8|int4_awq [--kv_cache_fp8] [--group_size 128]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trtc.formats.quant_layout import LINEARS, QuantConfig, pack_int4, quantize_fp8


def quantize_linear(w: torch.Tensor, qformat: str, prefix: str, module: str, group: int) -> dict[str, torch.Tensor]:
    """w: [out, in], or [E, out, in] for stacked experts -> the layout's tensors of linear `prefix`."""
    w = w.float()
    if qformat == "fp8" and w.dim() == 3:  # one scale per expert
        scale = w.abs().amax(dim=(1, 2)) / 448  # [E]
        return {prefix + ".weight": quantize_fp8(w, scale[:, None, None]), prefix + ".weight_scale": scale.cpu(),
                prefix + ".input_scale": torch.full_like(scale, 0.05).cpu()}
    if w.dim() == 3:
        raise SystemExit(f"{prefix}: INT4 experts are not in trtc's quantized layout")
    if qformat == "fp8":
        scale = w.abs().amax() / 448
        return {prefix + ".weight": quantize_fp8(w, scale), prefix + ".weight_scale": scale.cpu(),
                prefix + ".input_scale": torch.tensor(0.05)}
    out, inp = w.shape
    g = w.view(out, inp // group, group)
    scale = (g.abs().amax(-1) / 7).clamp(min=1e-8)  # [out, in / group], symmetric
    u = (torch.round(g / scale[..., None]) + 8).clamp(0, 15).view(out, inp)
    t = {prefix + ".weight": pack_int4(u).cpu(), prefix + ".weight_scale": scale.cpu()}
    if module in ("attention.o", "mlp.down"):  # AWQ exports keep a pre-quant scale only where no norm absorbs it
        t[prefix + ".pre_quant_scale"] = torch.ones(inp)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("qformat", choices=["fp8", "int4_awq"])
    ap.add_argument("--kv_cache_fp8", action="store_true")
    ap.add_argument("--group_size", type=int, default=128)
    args = ap.parse_args()
    cfg = json.loads((args.src / "config.json").read_text())
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    quant = QuantConfig(quant_algo="FP8" if args.qformat == "fp8" else "W4A16_AWQ", group_size=args.group_size,
                        kv_cache_quant_algo="FP8" if args.kv_cache_fp8 else None)
    args.dst.mkdir(parents=True, exist_ok=True)
    for f in args.src.iterdir():
        if f.is_dir():
            shutil.copytree(f, args.dst / f.name, dirs_exist_ok=True)
    for rank_path in sorted(args.src.glob("rank*.safetensors")):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(rank_path), framework="pt", device=dev) as f:
            for name in f.keys():
                parts = name.split(".")
                module = ".".join(parts[2:-1]) if name.startswith("layers.") else ""
                if module in LINEARS and parts[-1] == "weight":
                    tensors.update(quantize_linear(f.get_tensor(name), args.qformat, name[: -len(".weight")], module,
                                                   args.group_size))
                else:
                    tensors[name] = f.get_tensor(name).cpu()
        if args.kv_cache_fp8:
            for i in range(len(cfg["graph"]["layers"])):
                for kv in ("k", "v"):
                    tensors[f"layers.{i}.attention.{kv}_cache_scale"] = torch.tensor(0.05)
        save_file(tensors, str(args.dst / rank_path.name), metadata={"format": "pt"})
    cfg["quantization"] = quant.to_dict()
    (args.dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


if __name__ == "__main__":
    main()
