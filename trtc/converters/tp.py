"""Which part of each checkpoint tensor a tensor-parallel rank holds.

column-parallel: q/k/v and gate/up split along the output rows (k/v by KV head, replicated when
tp > KV heads); row-parallel: o and down split along the input columns (their biases are
replicated and added once, after the all-reduce); vocab-parallel: embedding and LM head split by
vocabulary rows, the vocabulary padded with zero rows to a multiple of tp. Everything else
(norms) is replicated.

A mixture of experts splits every expert's intermediate dimension (the dense MLP's rule, one axis
further in: gate/up [E, I, hidden] by I rows, down [E, hidden, I] by I columns); its shared expert
splits like a dense MLP; the router and the shared expert's gate are replicated, so every rank
routes alike and the partial outputs are summed by the MLP's all-reduce.

Quantized layers (trtc/formats/quant_layout.py) split with their layer: column-parallel ones split
weight, weight_scale and weight_zero by rows and keep pre_quant_scale and input_perm whole;
row-parallel ones split an INT4 weight by bytes (two columns each), weight_scale / weight_zero by
groups and pre_quant_scale by columns. Per-tensor scales (FP8, KV cache) are replicated; per-channel
FP8 weight scales split with their rows (column-parallel) or are replicated (row-parallel).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trtc.errors import TrtcError
from trtc.formats.graph import ModelGraph
from trtc.formats.mapping import Mapping
from trtc.formats.quant_layout import QuantConfig

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class Shard:
    """Rows or columns [start, stop) of `dim`; dim None means the whole tensor."""

    dim: int | None
    start: int = 0
    stop: int = 0

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        if self.dim is None:
            return full
        s = list(full)
        s[self.dim] = self.stop - self.start
        return tuple(s)


_COLUMN_PARALLEL = ("attention.q", "attention.k", "attention.v", "mlp.gate", "mlp.up", "mlp.shared.gate",
                    "mlp.shared.up", "mlp.experts.gate", "mlp.experts.up")
_ROW_PARALLEL = ("attention.o", "mlp.down", "mlp.shared.down", "mlp.experts.down")
_ROW_SPLIT = ("weight", "weight_scale", "weight_zero")  # suffixes split along out rows (column-parallel)


def shard_for(name: str, graph: ModelGraph, mapping: Mapping, rank: int, quant: QuantConfig | None = None) -> Shard:
    tp = mapping.tp_size
    if name in ("embedding.weight", "lm_head.weight"):
        n = mapping.local_vocab(graph.vocab_size)
        return Shard(0, rank * n, (rank + 1) * n)
    m = _LAYER.fullmatch(name)
    if m is None or tp == 1:
        return Shard(None)
    layer = graph.layers[int(m.group(1))]
    a, (module, _, suffix) = layer.attention, m.group(2).rpartition(".")
    d = a.head_dim
    # a per-tensor FP8 weight scale (one per expert in a stack) is replicated; per-channel ones split with the rows
    fp8_scale = quant is not None and quant.is_fp8 and not quant.weight_scale_per_channel and suffix == "weight_scale"
    if module.startswith("mlp.experts."):  # [E, ...]: the rule of a dense layer, one axis further in
        inner = shard_for(f"layers.{m.group(1)}.mlp.{module[12:]}.{suffix}", graph, mapping, rank, quant)
        return inner if inner.dim is None else Shard(inner.dim + 1, inner.start, inner.stop)
    if module in _COLUMN_PARALLEL:
        if suffix not in (*_ROW_SPLIT, "bias") or fp8_scale:
            return Shard(None)
        if module == "attention.q":
            n = mapping.local_heads(a) * d
            return Shard(0, rank * n, (rank + 1) * n)
        if module in ("attention.k", "attention.v"):
            start = mapping.kv_head_start(a, rank) * d
            return Shard(0, start, start + mapping.local_kv_heads(a) * d)
        n = _mlp_size(layer, module) // tp
        return Shard(0, rank * n, (rank + 1) * n)
    if module in _ROW_PARALLEL:
        n = mapping.local_heads(a) * d if module == "attention.o" else _mlp_size(layer, module) // tp
        int4 = quant is not None and quant.is_int4 and quant.quantizes(int(m.group(1)), module)
        if suffix == "pre_quant_scale":
            return Shard(0, rank * n, (rank + 1) * n)
        if suffix == "weight" and int4:  # packed: a byte holds two input columns
            return Shard(1, rank * n // 2, (rank + 1) * n // 2)
        if suffix == "weight" or (int4 and suffix in ("weight_scale", "weight_zero")):
            per = quant.group_size if suffix != "weight" else 1
            return Shard(1, rank * n // per, (rank + 1) * n // per)
    return Shard(None)


def _mlp_size(layer, module: str) -> int:
    """The intermediate size of MLP linear `module` (the shared expert's, or the MLP's / an expert's)."""
    return layer.mlp.moe.shared_intermediate_size if module.startswith("mlp.shared.") else layer.mlp.intermediate_size


def validate_quantized_split(graph: ModelGraph, mapping: Mapping, quant: QuantConfig | None) -> None:
    """Raise a TrtcError if the quantized layers cannot be split `tp` ways."""
    tp = mapping.tp_size
    if quant is None or not quant.is_int4 or tp == 1:
        return
    if quant.has_input_perm:
        raise TrtcError(
            f"--tp {tp}: an act-order (desc_act) GPTQ checkpoint cannot be split over ranks, its input "
            "permutation crosses the row-parallel shards; use --tp 1 or a checkpoint quantized without act-order"
        )
    for i, layer in enumerate(graph.layers):
        a, moe = layer.attention, layer.mlp.moe
        row_parallel = [("attention.o", mapping.local_heads(a) * a.head_dim),
                        ("mlp.experts.down" if moe else "mlp.down", layer.mlp.intermediate_size // tp)]
        if moe and moe.shared_intermediate_size:
            row_parallel.append(("mlp.shared.down", moe.shared_intermediate_size // tp))
        for module, n in row_parallel:
            if quant.quantizes(i, module) and n % quant.group_size:
                raise TrtcError(
                    f"--tp {tp}: layers.{i}.{module} would hold {n} input features per rank, not a multiple "
                    f"of the INT4 group size {quant.group_size}; use a smaller --tp or group size"
                )
