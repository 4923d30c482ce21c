"""The memory plan of a build, before any work: what one rank of the engine needs on its GPU.

    weights      the rank's tensors in their checkpoint dtypes (quantized layers packed), from the
                 layer graph, the tensor-parallel split and the quantization (no file is read)
    KV cache     k and v of every layer for max_batch_size x max_seq_len tokens in the KV-cache
                 dtype (the most the scheduler can hold; the runtime sizes its pool from free memory)
    activations  one step of max_num_tokens tokens: the largest live tensors of a layer (hidden
                 and residual, qkv, attention output, gate/up and its activation), float32 logits
                 of max_batch_size rows with the sampler's copy, and an INT4 layer's dequantized
                 weight (the large-M tactic)

A build fits when weights + activations + the KV cache of one max_seq_len sequence + OVERHEAD
(CUDA context, cuBLAS workspaces) fit the target GPU's memory; otherwise it stops before any work
with one line naming the flag to change. The plan says how many full-length sequences the rest holds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from trtc.converters.tp import shard_for
from trtc.errors import TrtcError
from trtc.formats.build_config import BuildConfig, kv_cache_torch_dtype
from trtc.formats.checkpoint import torch_dtype
from trtc.formats.graph import ModelGraph
from trtc.formats.mapping import Mapping
from trtc.formats.quant_layout import QuantConfig, checkpoint_dtype

GIB = 2**30
OVERHEAD = 1 * GIB


@dataclass
class MemoryPlan:
    tp_size: int
    weights: int  # bytes per rank (the largest rank)
    kv_cache: int  # bytes per rank at max_batch_size x max_seq_len
    kv_per_token: int  # bytes per rank per token
    activations: int  # bytes per rank for a step of max_num_tokens
    max_batch_size: int
    max_seq_len: int
    max_num_tokens: int
    kv_cache_dtype: str
    capacity: int | None = None  # the target GPU's memory, where known

    @property
    def minimum(self) -> int:
        """What one max_seq_len request needs."""
        return self.weights + self.activations + self.kv_per_token * self.max_seq_len + OVERHEAD

    def full_length_sequences(self) -> int | None:
        if self.capacity is None:
            return None
        rest = self.capacity - self.weights - self.activations - OVERHEAD
        return max(0, rest // max(1, self.kv_per_token * self.max_seq_len))

    def to_dict(self) -> dict:
        return {**asdict(self), "overhead": OVERHEAD, "fits": self.fits(),
                "full_length_sequences": self.full_length_sequences()}

    def fits(self) -> bool | None:
        return None if self.capacity is None else self.minimum <= self.capacity

    def lines(self) -> list[str]:
        where = f", GPU memory {size(self.capacity)}" if self.capacity else ", GPU memory unknown (--gpu_memory)"
        out = [f"memory plan per rank (tp {self.tp_size}{where}):",
               f"  weights      {size(self.weights):>12}",
               f"  KV cache     {size(self.kv_cache):>12}  at max_batch_size {self.max_batch_size} x max_seq_len "
               f"{self.max_seq_len} ({self.kv_cache_dtype}, {self.kv_per_token / 1024:.1f} KiB per token)",
               f"  activations  {size(self.activations):>12}  at max_num_tokens {self.max_num_tokens}",
               f"  overhead     {size(OVERHEAD):>12}  CUDA context and workspaces"]
        n = self.full_length_sequences()
        if n is not None:
            full = " (all of max_batch_size)" if n >= self.max_batch_size else ""
            out.append(f"  the rest of the GPU holds the KV cache of {min(n, self.max_batch_size)} sequences of "
                       f"max_seq_len{full}")
        return out

    def check(self) -> None:
        """Raise one line naming the flag to change if one max_seq_len request cannot fit."""
        if self.capacity is None or self.fits():
            return
        have = f"the GPU has {size(self.capacity)}"
        w, act = size(self.weights), size(self.activations)
        if self.weights + OVERHEAD > self.capacity:
            raise TrtcError(f"the weights need {w} per rank at tp {self.tp_size} (+ {size(OVERHEAD)} overhead) but {have}; "
                            "raise --tp or quantize the weights (--fp8, --int4_awq)")
        if self.weights + self.activations + OVERHEAD > self.capacity:
            raise TrtcError(f"weights {w} + activations {act} at --max_num_tokens {self.max_num_tokens} "
                            f"(+ {size(OVERHEAD)} overhead) do not fit: {have}; lower --max_num_tokens")
        raise TrtcError(f"one sequence of --max_seq_len {self.max_seq_len} needs {size(self.kv_per_token * self.max_seq_len)} "
                        f"of KV cache beside weights {w}, activations {act} and {size(OVERHEAD)} overhead: {have}; "
                        "lower --max_seq_len (or --kv_cache_dtype fp8)")


def size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.2f} MiB"


def memory_plan(graph: ModelGraph, mapping: Mapping, dtype: str, quant: QuantConfig | None, config: BuildConfig,
                capacity: int | None = None) -> MemoryPlan:
    """config: resolved (BuildConfig.resolved): max_seq_len and kv_cache_dtype decided."""
    model_dtype = torch_dtype(dtype)
    shapes = graph.weight_shapes(quant)
    weights = max(
        sum(_numel(shard_for(name, graph, mapping, rank, quant).shape(shape))
            * checkpoint_dtype(name, model_dtype, quant).itemsize for name, shape in shapes.items())
        for rank in range(mapping.tp_size)
    )
    kv_size = kv_cache_torch_dtype(config.kv_cache_dtype).itemsize
    kv_per_token = sum(2 * mapping.local_kv_heads(layer.attention) * layer.attention.head_dim * kv_size
                       for layer in graph.layers)
    return MemoryPlan(
        tp_size=mapping.tp_size, weights=weights, kv_cache=kv_per_token * config.max_batch_size * config.max_seq_len,
        kv_per_token=kv_per_token, activations=_activations(graph, mapping, model_dtype.itemsize, quant, config),
        max_batch_size=config.max_batch_size, max_seq_len=config.max_seq_len, max_num_tokens=config.max_num_tokens,
        kv_cache_dtype=config.kv_cache_dtype, capacity=capacity,
    )


def _activations(graph: ModelGraph, mapping: Mapping, size: int, quant: QuantConfig | None, config: BuildConfig) -> int:
    per_token, dequant = 0, 0
    for layer in graph.layers:
        a, tp = layer.attention, mapping.tp_size
        hq, hkv = mapping.local_heads(a), mapping.local_kv_heads(a)
        inter = layer.mlp.intermediate_size // tp
        per_token = max(per_token, 2 * graph.hidden_size + (2 * hq + 2 * hkv) * a.head_dim + 3 * inter)
        if quant is not None and quant.is_int4:
            dequant = max(dequant, 2 * inter * graph.hidden_size * size)
    logits = 2 * config.max_batch_size * mapping.padded_vocab(graph.vocab_size) * 4
    return per_token * config.max_num_tokens * size + logits + dequant


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def capacity(target: dict, gpu_memory: float | None = None) -> int | None:
    """The memory the plan must fit: --gpu_memory GiB, else the target GPU's (present or named)."""
    from trtc.compiler.targets import target_memory_bytes

    if gpu_memory is not None:
        if gpu_memory <= 0:
            raise TrtcError(f"--gpu_memory must be a positive number of GiB, got {gpu_memory}")
        return int(gpu_memory * GIB)
    return target_memory_bytes(target)
