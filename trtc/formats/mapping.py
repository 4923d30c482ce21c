"""How a model is split over ranks: tensor parallelism decided at convert time."""

from __future__ import annotations

from dataclasses import dataclass

from trtc.errors import TrtcError
from trtc.formats.graph import AttentionConfig, ModelGraph


@dataclass
class Mapping:
    world_size: int = 1
    tp_size: int = 1
    pp_size: int = 1

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.pp_size != 1:
            raise TrtcError(f"tp_size must be >= 1 and pp_size 1, got tp {self.tp_size}, pp {self.pp_size}")
        if self.world_size != self.tp_size * self.pp_size:
            raise TrtcError(f"world_size {self.world_size} != tp_size {self.tp_size} x pp_size {self.pp_size}")

    @classmethod
    def for_tp(cls, tp_size: int) -> Mapping:
        return cls(world_size=tp_size, tp_size=tp_size)

    def to_dict(self) -> dict[str, int]:
        return {"world_size": self.world_size, "tp_size": self.tp_size, "pp_size": self.pp_size}

    def validate(self, graph: ModelGraph) -> None:
        """Raise a TrtcError if `graph` cannot be split `tp_size` ways; it names the tp values that work."""
        problem = split_problem(graph, self.tp_size)
        if problem is not None:
            valid = ", ".join(str(t) for t in valid_tp_sizes(graph))
            raise TrtcError(f"--tp {self.tp_size} {problem}; valid --tp values for this model: {valid}")

    # Per-rank sizes ---------------------------------------------------------------------------
    def local_heads(self, a: AttentionConfig) -> int:
        return a.num_heads // self.tp_size

    def local_kv_heads(self, a: AttentionConfig) -> int:
        """KV heads held by one rank; replicated (1 per rank) when tp > kv heads."""
        return max(1, a.num_kv_heads // self.tp_size)

    def kv_head_start(self, a: AttentionConfig, rank: int) -> int:
        if a.num_kv_heads >= self.tp_size:
            return rank * self.local_kv_heads(a)
        return rank // (self.tp_size // a.num_kv_heads)

    def padded_vocab(self, vocab_size: int) -> int:
        return -(-vocab_size // self.tp_size) * self.tp_size

    def local_vocab(self, vocab_size: int) -> int:
        return self.padded_vocab(vocab_size) // self.tp_size


def split_problem(graph: ModelGraph, tp: int) -> str | None:
    """Why `graph` cannot be split `tp` ways (heads, KV heads, MLP size), or None if it can."""
    for i, layer in enumerate(graph.layers):
        a = layer.attention
        if a.num_heads % tp:
            return f"does not divide the {a.num_heads} attention heads"
        if a.num_kv_heads % tp and tp % a.num_kv_heads:
            return f"neither divides nor is a multiple of the {a.num_kv_heads} KV heads"
        if layer.mlp.intermediate_size % tp:
            return f"does not divide the MLP size {layer.mlp.intermediate_size} of layer {i}"
        moe = layer.mlp.moe
        if moe is not None and moe.shared_intermediate_size % tp:
            return f"does not divide the shared expert's size {moe.shared_intermediate_size} of layer {i}"
    return None


def valid_tp_sizes(graph: ModelGraph, at_most: int | None = None) -> list[int]:
    """Every tp the graph splits into (up to `at_most`, default the heads of the first layer)."""
    top = graph.layers[0].attention.num_heads if at_most is None else at_most
    return [tp for tp in range(1, top + 1) if split_problem(graph, tp) is None]
