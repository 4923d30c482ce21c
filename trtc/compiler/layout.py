"""Weights in the layout the runtime's kernels read: q/k/v fused into one GEMM, gate/up fused
into one GEMM. Everything else keeps the checkpoint's [out_features, in_features] layout, which
cuBLAS reads as is through torch."""

from __future__ import annotations

from trtc.graph import ModelGraph
from trtc.mapping import Mapping

# engine tensor suffix -> checkpoint suffixes concatenated along dim 0
FUSIONS = {
    "attention.qkv.weight": ("attention.q.weight", "attention.k.weight", "attention.v.weight"),
    "attention.qkv.bias": ("attention.q.bias", "attention.k.bias", "attention.v.bias"),
    "mlp.gate_up.weight": ("mlp.gate.weight", "mlp.up.weight"),
    "mlp.gate_up.bias": ("mlp.gate.bias", "mlp.up.bias"),
}


def engine_tensors(checkpoint_names: list[str], graph: ModelGraph) -> dict[str, tuple[str, ...]]:
    """Engine tensor name -> the checkpoint tensors it is made of, in checkpoint order."""
    present = set(checkpoint_names)
    plan: dict[str, tuple[str, ...]] = {}
    fused: set[str] = set()
    for i in range(graph.num_layers):
        p = f"layers.{i}."
        for target, parts in FUSIONS.items():
            sources = tuple(p + s for s in parts)
            if all(s in present for s in sources):
                plan[p + target] = sources
                fused.update(sources)
    for name in checkpoint_names:
        if name not in fused:
            plan[name] = (name,)
    return dict(sorted(plan.items(), key=lambda kv: checkpoint_names.index(kv[1][0])))


def local_qkv_sizes(graph: ModelGraph, mapping: Mapping, layer: int) -> tuple[int, int, int]:
    """Rows of q, k and v in a rank's fused qkv weight."""
    a = graph.layers[layer].attention
    q = mapping.local_heads(a) * a.head_dim
    kv = mapping.local_kv_heads(a) * a.head_dim
    return q, kv, kv
