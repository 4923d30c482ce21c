"""The identity of one build, so that rank files of different builds are never run together.

An engine directory's config.json carries `build_id`, and every rank{N}.engine carries the same
id in its safetensors metadata (`trtc_build_id`). The id is a fingerprint of what determines the
build's output: the engine config (graph, mapping, quantization, build config, target, trtc
version) and the checkpoint's tensors (names, dtypes, shapes, and the bytes of their first, middle
and last rows). It costs a few reads per tensor, not a pass over the weights, and two builds from
the same inputs get the same id, so they stay byte-identical.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from trtc.errors import TrtcError
from trtc.formats.checkpoint import rank_file

METADATA_KEY = "trtc_build_id"
ROWS_1D = 1024  # elements sampled at each place of a vector (a norm weight, a bias)


def build_fingerprint(engine_config: dict, checkpoint_dir: Path, world_size: int) -> str:
    h = hashlib.sha256(json.dumps(engine_config, sort_keys=True).encode())
    for rank in range(world_size):
        path = rank_file(checkpoint_dir, rank)
        try:
            f = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types
            raise TrtcError(f"{path} is not a valid safetensors file ({e}); convert the model again") from None
        with f:
            for name in sorted(f.keys()):
                piece = f.get_slice(name)
                shape = piece.get_shape()
                h.update(f"{rank}/{name}/{piece.get_dtype()}/{shape}".encode())
                for t in _samples(f, name, shape):
                    h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _samples(f, name: str, shape: list[int]) -> list[torch.Tensor]:
    if len(shape) == 0 or shape[0] == 0:
        return [f.get_tensor(name)]
    n, k = shape[0], 1 if len(shape) > 1 else min(shape[0], ROWS_1D)
    piece = f.get_slice(name)
    return [piece[start : start + k] for start in sorted({0, (n - k) // 2, n - k})]


def read_build_id(path: Path) -> str | None:
    """The build id in a rank file's metadata (None if it has none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(METADATA_KEY)
    except Exception as e:  # safetensors raises its own error types
        raise TrtcError(f"{path} is not a valid safetensors file ({e}); the engine is damaged, rebuild it") from None
