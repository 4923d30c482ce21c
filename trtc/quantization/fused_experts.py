"""INT4 experts through ModelOpt's unified HF export.

transformers 5 keeps a mixture's experts fused: `gate_up_proj` [E, 2I, H] (gate rows, then up rows)
and `down_proj` [E, H, I] per layer. ModelOpt quantizes them in place (`_QuantFusedExperts`): one
weight quantizer per expert and projection, one input quantizer per projection shared by the
experts. ModelOpt 0.47 exports FP8 experts, but an INT4 export fails twice:
  * its AWQ resmoothing averages the experts' pre_quant_scale over `len(block.experts)`, which a
    fused module has not (`TypeError: object of type 'QuantMixtralExperts' has no len()`);
  * its split of gate_up slices each expert's block amax to the gate / up rows but reshapes it to
    the fused rows again on export, so INT4 packing indexes past the scales.
Neither step has work to do here: the input quantizer is shared, so every expert sees the same
pre_quant_scale (ModelOpt's AWQ does not search fused experts at all: their weights get plain max
calibration of each block). So `modelopt_export` skips that resmoothing for fused experts, and
`export_int4_experts` (registered through ModelOpt's export-handler registry, ahead of its own
handler) writes each expert's gate / up / down as ModelOpt writes a dense INT4 linear
(W4A16_AWQ): `weight` uint8 [out / 2, in] packed by ModelOpt's `to_quantized_weight`,
`weight_scale` float32 [out, in / block] = amax / 7, `pre_quant_scale` [in] when the shared input
quantizer holds one. The names are ModelOpt's for split experts (`{experts}.{e}.gate_proj`, ...),
which its export maps back to the checkpoint's (`block_sparse_moe.experts.{e}.w1`, ...); the
converter's ModelOpt importer reads them like the FP8 experts. FP8 experts keep ModelOpt's handler.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

_FUSED_ATTRS = ("gate_up_proj", "gate_up_proj_weight_quantizers", "gate_up_proj_input_quantizer",
                "down_proj", "down_proj_weight_quantizers", "down_proj_input_quantizer")


def is_fused_experts(module: nn.Module) -> bool:
    """transformers 5's fused expert container: a 3-D gate_up_proj [E, 2I, H]."""
    w = getattr(module, "gate_up_proj", None)
    return isinstance(w, torch.Tensor) and w.dim() == 3


def is_int4_fused_experts(module: nn.Module) -> bool:
    """Fused experts that ModelOpt quantized with INT4 block weight quantizers."""
    quantizers = getattr(module, "gate_up_proj_weight_quantizers", None)
    if not is_fused_experts(module) or quantizers is None or not hasattr(module, "down_proj_weight_quantizers"):
        return False
    q = quantizers[0]
    return bool(q.is_enabled and q.num_bits == 4 and q.block_sizes and q.block_sizes.get(-1))


def export_int4_experts(name: str, module: nn.Module, ctx) -> None:
    """ModelOpt export handler: replace fused INT4 experts by per-expert exported linears
    (`{e}.gate_proj`, `{e}.up_proj`, `{e}.down_proj`, each weight + weight_scale [+ pre_quant_scale])."""
    gate_up, down = module.gate_up_proj.data, module.down_proj.data  # [E, 2I, H], [E, H, I]
    inter = gate_up.shape[1] // 2
    gate_up_input, down_input = module.gate_up_proj_input_quantizer, module.down_proj_input_quantizer
    for e in range(gate_up.shape[0]):
        q_gate_up, q_down = module.gate_up_proj_weight_quantizers[e], module.down_proj_weight_quantizers[e]
        expert = nn.Module()
        expert.add_module("gate_proj", _int4_linear(gate_up[e], slice(0, inter), q_gate_up, gate_up_input, ctx.dtype))
        expert.add_module("up_proj", _int4_linear(gate_up[e], slice(inter, 2 * inter), q_gate_up, gate_up_input, ctx.dtype))
        expert.add_module("down_proj", _int4_linear(down[e], slice(None), q_down, down_input, ctx.dtype))
        module.add_module(str(e), expert)
    for attr in _FUSED_ATTRS:  # the split experts replace the fused weights in the state dict
        delattr(module, attr)


def _int4_linear(weight: torch.Tensor, rows: slice, quantizer, input_quantizer, dtype: torch.dtype) -> nn.Module:
    """weight: [R, in] of one expert, of which `rows` are this linear's; quantizer: its INT4 block
    quantizer over all R rows (amax: one per block, R * in / block) -> a module holding the export."""
    from modelopt.torch.export.model_config import QUANTIZATION_INT4_AWQ
    from modelopt.torch.export.quant_utils import to_quantized_weight

    block = quantizer.block_sizes[-1]
    w = weight[rows]  # [out, in]
    amax = quantizer.amax
    if amax is None:  # never calibrated: the block maxima a dynamic quantizer would take
        amax = weight.abs().reshape(weight.shape[0], -1, block).amax(-1)
    amax = amax.float().reshape(weight.shape[0], -1)[rows]  # [out, in / block]
    amax = torch.where(amax > 0, amax, torch.full_like(amax, quantizer.maxbound))  # all-zero blocks: scale 1
    scale = amax / quantizer.maxbound
    linear = nn.Module()
    linear.weight = nn.Parameter(to_quantized_weight(w.to(dtype), scale, QUANTIZATION_INT4_AWQ, None, block),
                                 requires_grad=False)  # uint8 [out / 2, in]
    linear.register_buffer("weight_scale", scale)
    if input_quantizer.pre_quant_scale is not None:
        linear.register_buffer("pre_quant_scale", input_quantizer.pre_quant_scale.detach().to(dtype, copy=True))
    return linear


@contextlib.contextmanager
def fused_experts_export():
    """Around ModelOpt's `export_hf_checkpoint`: INT4 fused experts through `export_int4_experts`,
    and ModelOpt's per-expert AWQ resmoothing skipped for fused experts (nothing to average)."""
    import modelopt.torch.export.unified_export_hf as unified
    from modelopt.torch.export.registry import ExportModuleRegistry

    ExportModuleRegistry.register(predicate=is_int4_fused_experts, prepend=True)(export_int4_experts)
    experts_list = unified.get_experts_list

    def get_experts_list(module: nn.Module, model_type: str):
        return [] if is_fused_experts(module.experts) else experts_list(module, model_type)

    unified.get_experts_list = get_experts_list
    try:
        yield
    finally:
        unified.get_experts_list = experts_list
