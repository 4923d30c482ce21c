"""Weights in the layout the runtime's kernels read: q/k/v fused into one GEMM, gate/up fused
into one GEMM. Everything else keeps the checkpoint's [out_features, in_features] layout, which
cuBLAS reads as is through torch.

Quantized layers (trtc/formats/quant_layout.py) fuse too: INT4 weight, weight_scale and
weight_zero are concatenated along the output rows like a plain weight, pre_quant_scale and
input_perm must be the same for every part and are kept once. An FP8 fused layer keeps its parts'
weights as they are and gets a per-row weight_scale [out] (each part's scale over its rows) and
the max input_scale (ModelOpt's export already gives the parts one). Requantizing the parts to the
max of their scales instead, so that one scale serves the GEMM, would change the model:
books-16M's perplexity moved by 0.4-0.5% that way (benchmarks/quant_accuracy.py --requant).

A mixture of experts keeps its experts stacked: gate and up [E, I, hidden] fuse along each
expert's rows into experts.gate_up [E, 2I, hidden] (axis 1), down stays [E, hidden, I]; per-expert
FP8 scales [E] become [E, 2I] like a dense layer's per-tensor ones become [2I]. The shared expert
fuses like a dense MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trtc.errors import TrtcError
from trtc.formats.graph import ModelGraph
from trtc.formats.mapping import Mapping

# engine module -> the checkpoint modules fused into it, in row order
FUSED_MODULES = {
    "attention.qkv": ("attention.q", "attention.k", "attention.v"),
    "mlp.gate_up": ("mlp.gate", "mlp.up"),
    "mlp.shared.gate_up": ("mlp.shared.gate", "mlp.shared.up"),
    "mlp.experts.gate_up": ("mlp.experts.gate", "mlp.experts.up"),  # [E, ...]: fused along axis 1
}
# how the parts' tensors of a suffix combine
RULES = {
    "weight": "cat",
    "bias": "cat",
    "weight_scale": "cat",  # per-group scales; per-tensor (FP8) ones become per-row, see engine_tensors
    "weight_zero": "cat",
    "input_scale": "max",
    "pre_quant_scale": "same",
    "input_perm": "same",
}


@dataclass(frozen=True)
class EngineTensor:
    parts: tuple[str, ...]  # checkpoint tensors it is made of, in row order
    rule: str = "cat"  # cat | max | same | rows (per-tensor scales -> one per row of the fused weight)
    weights: tuple[str, ...] = ()  # rows: the parts' weights, whose row counts the scales cover
    dim: int = 0  # the rows' axis: 1 in an expert stack [E, rows, ...]


def stack_depth(name: str) -> int:
    """Leading axes before a linear's own: 1 for an expert stack ([E, ...]), 0 otherwise."""
    return 1 if ".experts." in name else 0


def per_tensor(name: str, shape: list[int] | tuple[int, ...]) -> bool:
    """A per-tensor (per-expert) scale: no axis beyond the stack's."""
    return len(shape) == stack_depth(name)


def engine_tensors(checkpoint_names: list[str], graph: ModelGraph, scalar: set[str] = frozenset()) -> dict[str, EngineTensor]:
    """Engine tensor name -> how it is made from checkpoint tensors, in checkpoint order.
    `scalar`: the checkpoint tensors that are per-tensor scales (`per_tensor`)."""
    present = set(checkpoint_names)
    plan: dict[str, EngineTensor] = {}
    fused: set[str] = set()
    for i in range(graph.num_layers):
        p = f"layers.{i}."
        for target, modules in FUSED_MODULES.items():
            if not all(p + m + ".weight" in present for m in modules):
                continue
            for suffix, rule in RULES.items():
                sources = tuple(f"{p}{m}.{suffix}" for m in modules)
                have = [s in present for s in sources]
                if not any(have):
                    continue
                if not all(have):
                    raise TrtcError(
                        f"{', '.join(s for s, h in zip(sources, have) if h)} exist but not for every part of "
                        f"{p}{target}; the checkpoint's fused layers must be quantized alike, quantize or convert again"
                    )
                dim = stack_depth(target)
                if suffix == "weight_scale" and sources[0] in scalar:
                    plan[f"{p}{target}.{suffix}"] = EngineTensor(
                        sources, "rows", tuple(f"{p}{m}.weight" for m in modules), dim)
                else:
                    plan[f"{p}{target}.{suffix}"] = EngineTensor(sources, rule, dim=dim)
                fused.update(sources)
    for name in checkpoint_names:
        if name not in fused:
            plan[name] = EngineTensor((name,))
    return dict(sorted(plan.items(), key=lambda kv: checkpoint_names.index(kv[1].parts[0])))


def engine_shape(t: EngineTensor, shapes: list[list[int]], rows: list[int]) -> tuple[int, ...]:
    """shapes: of the parts; rows: of the parts' weights (rule rows)."""
    if t.rule == "rows":
        return (*shapes[0], sum(rows))
    if len(shapes) > 1 and t.rule == "cat":
        d = t.dim
        return (*shapes[0][:d], sum(s[d] for s in shapes), *shapes[0][d + 1:])
    return tuple(shapes[0])


def combine(name: str, t: EngineTensor, tensors: list[torch.Tensor], rows: list[int]) -> torch.Tensor:
    """The engine tensor `name` from its parts (rows: the row counts of the parts' weights)."""
    if t.rule == "rows":  # per-tensor [] (per-expert [E]) scales -> [rows] ([E, rows])
        return torch.cat([s.unsqueeze(-1).expand(*s.shape, n) for s, n in zip(tensors, rows)], dim=-1)
    if len(tensors) == 1:
        return tensors[0]
    if t.rule == "cat":
        return torch.cat(tensors, dim=t.dim)
    if t.rule == "max":
        return torch.stack(tensors).amax(dim=0)
    if any(not torch.equal(tensors[0], x) for x in tensors[1:]):  # same
        raise TrtcError(
            f"{', '.join(t.parts)} differ but {name} needs one for all of them; quantize with "
            "`trtc quantize` (ModelOpt's export shares them) or convert a checkpoint that shares them"
        )
    return tensors[0]


def local_qkv_sizes(graph: ModelGraph, mapping: Mapping, layer: int) -> tuple[int, int, int]:
    """Rows of q, k and v in a rank's fused qkv weight."""
    a = graph.layers[layer].attention
    q = mapping.local_heads(a) * a.head_dim
    kv = mapping.local_kv_heads(a) * a.head_dim
    return q, kv, kv
