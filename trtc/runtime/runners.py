"""The model runner of an engine's backend: trtc's own (cuda) or a TensorRT plan's."""

from __future__ import annotations

import torch

from trtc.errors import TrtcError
from trtc.formats.engine import Engine
from trtc.runtime.model_runner import ModelRunner


def make_runner(engine: Engine, device: torch.device, rank: int = 0, group=None):
    """A ModelRunner, or a TensorRTRunner (same interface) for an engine of backend tensorrt.
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
