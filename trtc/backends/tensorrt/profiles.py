"""The optimization profile of a rank's TensorRT plan: (min, opt, max) of every dynamic input,
from the build limits (--max_batch_size, --max_num_tokens, --max_seq_len, --tokens_per_block).
Pure arithmetic, so it is tested where TensorRT is absent."""

from __future__ import annotations

from trtc.formats.build_config import BuildConfig
from trtc.formats.graph import ModelGraph
from trtc.formats.mapping import Mapping
from trtc.onnx.lower import B1, GRAPH_INPUTS, MB, NB, POOL_INPUT, B, S, T, pool_dims

Shape = tuple[int, ...]


def dim_ranges(bc: BuildConfig) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each symbolic dimension of the graphs (trtc/onnx/lower.py). The opt
    point is a full decode step: what most steps of a busy server are."""
    tokens = bc.max_num_tokens
    batch = min(bc.max_batch_size, tokens)
    blocks_per_seq = -(-bc.max_seq_len // bc.tokens_per_block)
    pool_blocks = -(-bc.max_batch_size * bc.max_seq_len // bc.tokens_per_block)  # what the runtime allocates at most
    return {
        T: (1, batch, tokens),
        S: (1, batch, tokens),  # sampled rows, or every prompt token when prompt logits are asked for
        B: (1, batch, batch),
        B1: (2, batch + 1, batch + 1),
        MB: (1, blocks_per_seq, blocks_per_seq),
        NB: (1, pool_blocks, pool_blocks),
    }


def optimization_profile(graph: ModelGraph, mapping: Mapping, bc: BuildConfig) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Input name -> (min, opt, max) shapes, for IOptimizationProfile.set_shape."""
    ranges = dim_ranges(bc)

    def shapes(dims: list[int | str]) -> tuple[Shape, Shape, Shape]:
        lo, opt, hi = (tuple(ranges[d][k] if isinstance(d, str) else d for d in dims) for k in range(3))
        return lo, opt, hi

    profile = {name: shapes(dims) for name, (_, dims) in GRAPH_INPUTS.items()}
    for i in range(graph.num_layers):
        profile[POOL_INPUT.format(i)] = shapes(pool_dims(graph, mapping, bc, i))
    return profile
