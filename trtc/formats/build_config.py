"""The limits an engine is built for (TensorRT-LLM's trtllm-build flag names)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from trtc.errors import TrtcError
from trtc.formats.checkpoint import torch_dtype
from trtc.formats.graph import ModelGraph

KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16", "fp8")


@dataclass
class BuildConfig:
    max_batch_size: int = 256
    max_seq_len: int | None = None  # None: the model's max_position_embeddings
    max_num_tokens: int = 8192
    tokens_per_block: int = 32
    kv_cache_dtype: str = "auto"  # auto: fp8 for a checkpoint with FP8 KV-cache scales, else the weights' dtype
    cuda_graph_batch_sizes: list[int] | None = None  # decode batch sizes captured as CUDA graphs; None: decided at build

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_num_tokens", "tokens_per_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise TrtcError(f"--{name} must be a positive integer, got {value!r}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise TrtcError(f"--max_seq_len must be at least 2, got {self.max_seq_len}")
        tpb = self.tokens_per_block
        if tpb & (tpb - 1):
            raise TrtcError(f"--tokens_per_block must be a power of two, got {tpb}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise TrtcError(
                f"--kv_cache_dtype {self.kv_cache_dtype!r} is not supported; use one of: {', '.join(KV_CACHE_DTYPES)}"
            )

    def resolved(self, graph: ModelGraph, dtype: str, quantization: dict | None = None) -> BuildConfig:
        """The config with defaults decided for this model (what the engine records)."""
        kv_scales = bool(quantization) and quantization.get("kv_cache_quant_algo") == "FP8"
        kv = self.kv_cache_dtype
        if kv == "fp8" and not kv_scales:
            raise TrtcError(
                "--kv_cache_dtype fp8 needs calibrated KV-cache scales, which this checkpoint lacks; "
                "make it with `trtc quantize --kv_cache_dtype fp8`"
            )
        if kv == "auto":
            kv = "fp8" if kv_scales else dtype
        return BuildConfig(
            max_batch_size=self.max_batch_size,
            max_seq_len=self.max_seq_len or graph.max_position_embeddings,
            max_num_tokens=self.max_num_tokens,
            tokens_per_block=self.tokens_per_block,
            kv_cache_dtype=kv,
            cuda_graph_batch_sizes=self.cuda_graph_batch_sizes or default_graph_batch_sizes(self.max_batch_size),
        )

    def to_dict(self) -> dict:
        return asdict(self)


def default_graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to 256, of 32 up to 512 and of 64 beyond, up to
    max_batch_size: a decode batch is padded up to the nearest, so at most 1/8 of its rows (15 below
    256) are wasted once batches are large, and a 2048-row engine captures 53 graphs, not 132."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += [b for b in (*range(16, 257, 16), *range(288, 513, 32), *range(576, max_batch_size, 64))
              if b < max_batch_size]
    return sizes + [max_batch_size]


def kv_cache_torch_dtype(kv_cache_dtype: str) -> torch.dtype:
    """The pool's element type: float8_e4m3fn for fp8 (with per-layer scales), else the named dtype."""
    if kv_cache_dtype == "fp8":
        return torch.float8_e4m3fn
    return torch_dtype(kv_cache_dtype)
