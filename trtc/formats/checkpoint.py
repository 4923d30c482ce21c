"""The layer-graph checkpoint: config.json (graph + mapping + dtype + quantization) and
rank{N}.safetensors with that tensor-parallel rank's shard."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from trtc.errors import TrtcError
from trtc.formats.graph import ModelGraph
from trtc.formats.mapping import Mapping
from trtc.utils.config_json import check_format, read_config_json
from trtc.version import __version__

CHECKPOINT_FORMAT = "trtc-checkpoint"
CHECKPOINT_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise TrtcError(f"dtype {name!r} is not supported; use one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def rank_file(directory: Path, rank: int, suffix: str = "safetensors") -> Path:
    return Path(directory) / f"rank{rank}.{suffix}"


@dataclass
class CheckpointConfig:
    graph: ModelGraph
    mapping: Mapping
    dtype: str
    quantization: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "trtc_version": __version__,
            "architecture": self.graph.architecture,
            "dtype": self.dtype,
            "mapping": self.mapping.to_dict(),
            "quantization": self.quantization,
            "graph": self.graph.to_dict(),
        }

    def save(self, directory: Path) -> None:
        (Path(directory) / "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> CheckpointConfig:
        fix = "convert the model again with `trtc convert`"
        d = read_config_json(Path(directory), "checkpoint directory", fix)
        check_format(d, directory, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, fix)
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointConfig:
        return cls(
            graph=ModelGraph.from_dict(d["graph"]),
            mapping=Mapping(**d["mapping"]),
            dtype=d["dtype"],
            quantization=d.get("quantization"),
        )


def load_weights_file(path: Path, device: str | torch.device, fix: str) -> dict[str, torch.Tensor]:
    """A safetensors file straight onto `device`; a TrtcError ending in `fix` if it is missing or bad."""
    if not path.is_file():
        raise TrtcError(f"{path} is missing; {fix}")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise TrtcError(f"{path} is not a valid safetensors file ({e}); {fix}") from None


def load_rank_weights(directory: Path, rank: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_weights_file(rank_file(directory, rank), device, "the checkpoint is incomplete, convert the model again")
