"""The model runner of an engine's backend: trtc's own (cuda) or a TensorRT plan's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from trtc.errors import TrtcError
from trtc.formats.build_config import BuildConfig
from trtc.formats.engine import Engine
from trtc.plugins.attention.metadata import AttentionMetadata
from trtc.runtime.model_runner import ModelRunner


class Runner(Protocol):
    """What a rank's worker asks of a model runner. The runner owns the rank's weights and its
    KV-cache pool; the worker sizes the pool and captures the decode CUDA graphs around it."""

    device: torch.device
    build_config: BuildConfig

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, logits_indices: torch.Tensor,
                on_logits: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor | None:
        """input_ids: [T]; logits_indices: [S]. Returns logits [S, vocab] float32; with `on_logits`,
        hands them to on_logits(first row, rows [c, vocab]) in chunks as computed and returns None."""

    def allocate_kv_cache(self, num_blocks: int) -> None: ...

    def graph_capturable(self) -> bool: ...

    def weight_bytes(self) -> int: ...

    def kv_cache_bytes(self) -> int: ...

    def release(self) -> None:
        """Free the weights and the pool now; the runner is unusable after."""


def make_runner(engine: Engine, device: torch.device, rank: int = 0, group=None) -> Runner:
    """A ModelRunner, or a TensorRTRunner for an engine of backend tensorrt.
    group: the ranks' process groups (tensor parallelism), None for one rank."""
    if engine.backend != "tensorrt":
        return ModelRunner(engine, device, rank, group)
    from trtc.backends import tensorrt

    where = engine.directory
    if engine.tensorrt is None:
        raise TrtcError(f"engine {where} holds only the ONNX graphs of a tensorrt build (TensorRT was absent when it "
                        f"was built); finish it on a machine with TensorRT: trtc build --from_onnx {where} "
                        "--output_dir ENGINE_DIR")
    if not tensorrt.available():
        raise TrtcError(f"engine {where} is a TensorRT engine but TensorRT is not installed here (import tensorrt "
                        "failed); run it where TensorRT is, or rebuild it with --backend cuda")
    if group is not None:
        raise TrtcError(f"engine {where} is a TensorRT engine of {engine.mapping.world_size} ranks; the TensorRT runtime "
                        "runs one rank: rebuild it with --tp 1 or with --backend cuda")
    from trtc.backends.tensorrt.runner import TensorRTRunner

    return TensorRTRunner(engine, device, rank)
