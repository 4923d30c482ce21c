"""The tensorrt backend: the ONNX graphs of trtc/onnx built into TensorRT plans, with the trtc
nodes as TensorRT Python plugins, run by the same executor and C++ scheduler.

    ENGINE/config.json       backend "tensorrt"; "tensorrt": the plans' TensorRT version and
                             optimization profile, or null while only the ONNX graphs exist
    ENGINE/onnx/             rank{N}.onnx + rank{N}.onnx.data + plugins.json (trtc/onnx/export.py)
    ENGINE/rank{N}.engine    TensorRT plans (serialized ICudaEngine)
    ENGINE/timing.cache      TensorRT's timing cache, read again by a rebuild into ENGINE
    ENGINE/tokenizer/

Only builder.py, plugins.py and runner.py import tensorrt, and only when called; everything else
(lowering, profiles, messages) works where TensorRT is absent. This code is written from the
TensorRT Python API reference and runs only where TensorRT is installed (tests marked `tensorrt`).
"""

from __future__ import annotations

import functools

TIMING_CACHE = "timing.cache"
ONNX_DIR = "onnx"


@functools.cache
def available() -> bool:
    """`import tensorrt` works and is the real package (its Builder exists)."""
    try:
        import tensorrt
    except Exception:  # absent, or a stub that fails to import
        return False
    return hasattr(tensorrt, "Builder")


def missing() -> str | None:
    """Why TensorRT cannot build plans here, or None when it can."""
    if not available():
        return "TensorRT is not installed here (import tensorrt failed)"
    import torch

    if not torch.cuda.is_available():
        return "TensorRT builds plans on a GPU and this machine has none"
    return None


def unfinished(reason: str, onnx_dir: str, engine_dir: str) -> str:
    """The one-line message of a tensorrt build that stopped after the ONNX graphs."""
    return (f"{reason}; the ONNX graphs and plugin metadata are in {onnx_dir}; finish the build on a machine with "
            f"TensorRT: trtc build --from_onnx {engine_dir} --output_dir ENGINE_DIR")
