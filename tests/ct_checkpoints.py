"""compressed-tensors checkpoints (what llm-compressor writes) made with the `compressed-tensors`
library itself: a tiny random Llama gets a quantization scheme, its scales from the weights' own
ranges (and a fixed static activation scale), and is saved compressed. The same model, before
compression, runs the library's fake-quantized forward: the oracle of the import."""

from __future__ import annotations

from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams
from models import load_hf, make_hf_model

SHAPES = dict(hidden_size=128, intermediate_size=256)  # every linear's input a multiple of group 128
INPUT_SCALE = 0.02  # FP8 static activation scale: a range of +-9 with the tiny model's activations


def scheme(name: str) -> QuantizationScheme:
    """FP8 (per-tensor weight scales), FP8_CHANNEL (per-channel weight scales, per-tensor static
    activations), W4A16 / W4A16_ASYM (pack-quantized, group 128), or any library preset."""
    if name == "FP8_CHANNEL":
        base = preset_name_to_scheme("FP8", ["Linear"])
        weights = QuantizationArgs(**{**base.weights.model_dump(), "strategy": "channel"})
        return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=base.input_activations)
    return preset_name_to_scheme(name, ["Linear"])


def _set_qparams(module: torch.nn.Module) -> None:
    args = module.quantization_scheme.weights
    w = module.weight.detach().float()
    if args.strategy == "group":
        w = w.reshape(w.shape[0], -1, args.group_size)
        lo, hi = w.amin(-1), w.amax(-1)  # [out, groups]
    elif args.strategy == "channel":
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)  # [out, 1]
    else:
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    scale, zero = calculate_qparams(lo, hi, args)
    module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
    if hasattr(module, "weight_zero_point"):
        module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    if hasattr(module, "input_scale"):
        module.input_scale.data.fill_(INPUT_SCALE)


def make_ct_model(directory: Path, name: str, seed: int = 0, **overrides):
    """(oracle, qdir): the library's fake-quantized model (float32) and the compressed checkpoint."""
    fdir, qdir = directory / "float", directory / "ct"
    make_hf_model(fdir, "llama3_gqa", seed=seed, **{**SHAPES, **overrides})
    model = load_hf(fdir)
    config = QuantizationConfig(config_groups={"group_0": scheme(name)}, ignore=["lm_head"],
                                quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, config, show_progress=False)
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            _set_qparams(module)
    oracle = load_hf(fdir)
    apply_quantization_config(oracle, config, show_progress=False)
    oracle.load_state_dict(model.state_dict())
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(qdir)
    compressor.update_config(qdir)
    return oracle, qdir
