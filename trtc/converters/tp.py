"""Which part of each checkpoint tensor a tensor-parallel rank holds.

column-parallel: q/k/v and gate/up split along the output rows (k/v by KV head, replicated when
tp > KV heads); row-parallel: o and down split along the input columns (their biases are
replicated and added once, after the all-reduce); vocab-parallel: embedding and LM head split by
vocabulary rows, the vocabulary padded with zero rows to a multiple of tp. Everything else
(norms) is replicated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trtc.graph import ModelGraph
from trtc.mapping import Mapping

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


def shard_for(name: str, graph: ModelGraph, mapping: Mapping, rank: int) -> Shard:
    tp = mapping.tp_size
    if name in ("embedding.weight", "lm_head.weight"):
        n = mapping.local_vocab(graph.vocab_size)
        return Shard(0, rank * n, (rank + 1) * n)
    m = _LAYER.fullmatch(name)
    if m is None or tp == 1:
        return Shard(None)
    layer = graph.layers[int(m.group(1))]
    a, sub = layer.attention, m.group(2)
    d = a.head_dim
    if sub.startswith("attention.q."):
        n = mapping.local_heads(a) * d
        return Shard(0, rank * n, (rank + 1) * n)
    if sub.startswith(("attention.k.", "attention.v.")):
        start = mapping.kv_head_start(a, rank) * d
        return Shard(0, start, start + mapping.local_kv_heads(a) * d)
    if sub == "attention.o.weight":
        n = mapping.local_heads(a) * d
        return Shard(1, rank * n, (rank + 1) * n)
    n = layer.mlp.intermediate_size // tp
    if sub.startswith(("mlp.gate.", "mlp.up.")):
        return Shard(0, rank * n, (rank + 1) * n)
    if sub == "mlp.down.weight":
        return Shard(1, rank * n, (rank + 1) * n)
    return Shard(None)
