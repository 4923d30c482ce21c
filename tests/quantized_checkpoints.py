"""Quantized trtc checkpoints made from a converted float one without calibration: weights
quantized per trtc/formats/quant_layout.py with their own ranges, fixed activation and KV-cache
scales. What they compute is arbitrary but exact, which is all a check of two runtimes against
each other needs (ModelOpt calibration is tested in test_quantize.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trtc.formats.quant_layout import FP8_MAX, LINEARS, pack_int4, quantize_fp8

_LINEAR = re.compile(r"layers\.(\d+)\.(.+)\.weight")


def _int4(w: torch.Tensor, group: int, zero_point: bool) -> dict[str, torch.Tensor]:
    out, inp = w.shape
    g = w.reshape(out, inp // group, group)
    if zero_point:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = (hi - lo).clamp(min=1e-8) / 15
        zero = torch.round(-lo / scale).clamp(0, 15)
    else:
        scale, zero = g.abs().amax(-1).clamp(min=1e-8) / 7.5, torch.full((out, inp // group), 8.0)
    u = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, 15).reshape(out, inp)
    tensors = {"weight": pack_int4(u), "weight_scale": scale.float()}
    if zero_point:
        tensors["weight_zero"] = zero.to(torch.uint8)
    return tensors


# modules that read the same input share a GPTQ act-order permutation (their fused GEMM has one)
_SAME_INPUT = {"attention.q": "qkv", "attention.k": "qkv", "attention.v": "qkv", "attention.o": "o",
               "mlp.gate": "gate_up", "mlp.up": "gate_up", "mlp.down": "down"}


def quantize_checkpoint(src: Path, dst: Path, quant_algo: str | None, kv_fp8: bool = False, group_size: int = 32,
                        zero_point: bool = True, seed: int = 0) -> Path:
    """quant_algo: FP8 | W4A16_AWQ (with pre-quant scales on o and down, as ModelOpt exports) |
    W4A16_GPTQ (act-order: the weight's columns permuted, input_perm) | None."""
    dst.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    g = torch.Generator().manual_seed(seed)
    perms: dict[tuple[str, str], torch.Tensor] = {}
    for shard in sorted(src.glob("rank*.safetensors")):
        weights = {}
        for name, t in load_file(str(shard)).items():
            m = _LINEAR.fullmatch(name)
            if quant_algo is None or not (m and m.group(2) in LINEARS):
                weights[name] = t
                continue
            prefix = name[: -len(".weight")]
            if quant_algo == "FP8":
                scale = t.abs().amax().float() / FP8_MAX
                weights.update({name: quantize_fp8(t, scale), prefix + ".weight_scale": scale,
                                prefix + ".input_scale": torch.tensor(4.0 / FP8_MAX)})
                continue
            if quant_algo == "W4A16_GPTQ":  # x' = x[..., perm] against the columns w[:, perm]
                key = (m.group(1), _SAME_INPUT[m.group(2)])
                perm = perms.setdefault(key, torch.randperm(t.shape[1], generator=g).to(torch.int32))
                t = t[:, perm.long()]
                weights[prefix + ".input_perm"] = perm.clone()  # safetensors refuses shared memory
            elif m.group(2) in ("attention.o", "mlp.down"):
                weights[prefix + ".pre_quant_scale"] = torch.rand(t.shape[1], generator=g) + 0.5
            weights.update({f"{prefix}.{k}": v for k, v in _int4(t.float(), group_size, zero_point).items()})
        if kv_fp8:
            for i in range(len(config["graph"]["layers"])):
                weights[f"layers.{i}.attention.k_cache_scale"] = torch.tensor(3.0 / FP8_MAX)
                weights[f"layers.{i}.attention.v_cache_scale"] = torch.tensor(2.0 / FP8_MAX)
        save_file(weights, str(dst / shard.name), metadata={"format": "pt"})
    config["quantization"] = {
        "quant_algo": quant_algo, "kv_cache_quant_algo": "FP8" if kv_fp8 else None, "group_size": group_size,
        "has_zero_point": quant_algo in ("W4A16_AWQ", "W4A16_GPTQ") and zero_point,
        "has_input_perm": quant_algo == "W4A16_GPTQ", "exclude_modules": [],
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    if (src / "tokenizer").is_dir():
        shutil.copytree(src / "tokenizer", dst / "tokenizer")
    return dst
