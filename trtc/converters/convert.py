"""`trtc convert`: HF directory -> layer-graph checkpoint, streamed one tensor slice at a time.

For each rank the output file's header is known from the graph, so every tensor is read (only
the rank's slice, through `safe_open(...).get_slice`), cast and written before the next one is
read: peak memory is about one tensor, whatever the model size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from trtc.checkpoint import CheckpointConfig, DTYPES, dtype_name, rank_file, torch_dtype
from trtc.converters import architecture_for
from trtc.converters.hf_checkpoint import TOKENIZER_FILES, HFCheckpoint
from trtc.converters.tp import shard_for
from trtc.errors import TrtcError
from trtc.mapping import Mapping
from trtc.utils.atomic_dir import atomic_output_dir, check_output_dir
from trtc.utils.safetensors_writer import SafetensorsWriter


def resolve_dtype(dtype: str, hf_config: dict, hf: HFCheckpoint, first_tensor: str) -> torch.dtype:
    if dtype != "auto":
        return torch_dtype(dtype)
    name = hf_config.get("dtype") or hf_config.get("torch_dtype")
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    stored = hf.read(first_tensor, 0, 0, 1).dtype
    return stored if stored in DTYPES.values() else torch.float32


def convert(
    model_dir: str | Path,
    output_dir: str | Path,
    tp_size: int = 1,
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Convert `model_dir` into a trtc checkpoint at `output_dir`; returns the output path.

    progress: True/False forces the bar on/off; None shows it only on a terminal.
    """
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if dtype != "auto":
        torch_dtype(dtype)  # unknown dtype: fail before reading anything
    check_output_dir(output_dir, overwrite)
    hf = HFCheckpoint(model_dir)
    arch = architecture_for(hf.config)
    graph = arch.graph_from_config(hf.config)
    mapping = Mapping.for_tp(tp_size)
    mapping.validate(graph)
    shapes = graph.weight_shapes()
    sources = _check_tensors(hf, arch.weights, shapes)
    out_dtype = resolve_dtype(dtype, hf.config, hf, sources["embedding.weight"])
    config = CheckpointConfig(graph=graph, mapping=mapping, dtype=dtype_name(out_dtype))

    bar = tqdm(total=len(shapes) * tp_size, desc="convert", unit="tensor", disable=_disable(progress))
    with bar, atomic_output_dir(output_dir, overwrite) as tmp:
        config.save(tmp)
        for rank in range(tp_size):
            shards = {name: shard_for(name, graph, mapping, rank) for name in shapes}
            entries = [(name, out_dtype, shards[name].shape(shape)) for name, shape in shapes.items()]
            with SafetensorsWriter(rank_file(tmp, rank), entries, {"format": "pt"}) as writer:
                for name, shape in shapes.items():
                    s = shards[name]
                    t = hf.read(sources[name], s.dim, s.start, s.stop).to(out_dtype)
                    if s.dim is not None and t.shape[s.dim] < s.stop - s.start:  # vocab padding
                        pad = [0, 0] * (t.dim() - 1 - s.dim) + [0, s.stop - s.start - t.shape[s.dim]]
                        t = F.pad(t, pad)
                    writer.write(name, t)
                    bar.update()
        _copy_tokenizer(model_dir, tmp / "tokenizer")
    return output_dir


def _check_tensors(hf: HFCheckpoint, weights, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Map every expected tensor to its HF source; check presence, shape and leftovers."""
    sources: dict[str, str] = {}
    for name, shape in shapes.items():
        src = weights.source(name)
        if src not in hf:
            raise TrtcError(f"tensor {src} is missing from the weights in {hf.model_dir}; the checkpoint does not match config.json")
        got = hf.shape(src)
        if got != shape:
            raise TrtcError(
                f"tensor {src} has shape {list(got)} but config.json implies {list(shape)}; "
                "the weights and config.json disagree, fix config.json or re-download"
            )
        sources[name] = src
    used = set(sources.values())
    # a mapped tensor the graph does not need (the LM head of a model with tied embeddings) is dropped
    dropped = {weights.names[k] for k in weights.names if "{i}" not in k and weights.names[k] not in used}
    for name in hf.names():
        if name not in used and name not in dropped and not weights.is_unused(name):
            raise TrtcError(
                f"tensor {name} in {hf.model_dir} is not used by the {hf.config['architectures'][0]} "
                "converter; the checkpoint does not match its architecture"
            )
    return sources


def _copy_tokenizer(model_dir: Path, dest: Path) -> None:
    dest.mkdir()
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, dest / name)
    # AutoTokenizer picks the tokenizer class from the model type when tokenizer_config.json does
    # not name one, so the HF config travels with the tokenizer.
    shutil.copyfile(model_dir / "config.json", dest / "config.json")


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress
