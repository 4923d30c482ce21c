"""One rank's engine tensors (kernel layout: fused qkv / gate_up), streamed one at a time: made
from a checkpoint shard by the fusion plan of layout.py, or read back from a built engine. The
cuda backend writes them into rank{N}.engine; the tensorrt backend into the ONNX graph's
external data."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from trtc.errors import TrtcError
from trtc.formats.checkpoint import rank_file
from trtc.formats.engine_layout import combine, engine_shape, engine_tensors, per_tensor
from trtc.formats.graph import ModelGraph
from trtc.utils.safetensors_writer import DTYPE_OF_CODE


@dataclass
class RankTensors:
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]]  # (name, dtype, shape) in the order read() yields
    read: Callable[[], Iterator[tuple[str, torch.Tensor]]]

    def shapes(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {name: (dtype, tuple(shape)) for name, dtype, shape in self.entries}


def _open(path: Path, fix: str):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types
        raise TrtcError(f"{path} is not a valid safetensors file ({e}); {fix}") from None


@contextlib.contextmanager
def checkpoint_rank(checkpoint_dir: Path, rank: int, graph: ModelGraph) -> Iterator[RankTensors]:
    """The engine tensors of a checkpoint shard, fused as they are built."""
    with _open(rank_file(checkpoint_dir, rank), "convert the model again") as f:
        names = sorted(f.keys())
        scalar = {n for n in names if per_tensor(n, f.get_slice(n).get_shape())}
        plan = engine_tensors(names, graph, scalar)
        rows = {target: [f.get_slice(w).get_shape()[t.dim] for w in t.weights] for target, t in plan.items()}
        entries = []
        for target, t in plan.items():
            shapes = [f.get_slice(p).get_shape() for p in t.parts]
            dtype = DTYPE_OF_CODE[f.get_slice(t.parts[0]).get_dtype()]
            entries.append((target, dtype, engine_shape(t, shapes, rows[target])))

        def read() -> Iterator[tuple[str, torch.Tensor]]:
            for target, t in plan.items():
                yield target, combine(target, t, [f.get_tensor(p) for p in t.parts], rows[target])

        yield RankTensors(entries, read)


@contextlib.contextmanager
def engine_rank(engine_dir: Path, rank: int) -> Iterator[RankTensors]:
    """The tensors of a built cuda engine's rank{N}.engine, as they are."""
    with _open(rank_file(engine_dir, rank, "engine"), "rebuild the engine") as f:
        names = list(f.keys())
        entries = [(n, DTYPE_OF_CODE[f.get_slice(n).get_dtype()], tuple(f.get_slice(n).get_shape())) for n in names]
        yield RankTensors(entries, lambda: ((n, f.get_tensor(n)) for n in names))
