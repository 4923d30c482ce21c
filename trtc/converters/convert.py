"""`trtc convert`: HF directory -> layer-graph checkpoint, streamed one tensor slice at a time.

For each rank the output file's header is known from the graph, so every tensor is read (only
the rank's slice, through `safe_open(...).get_slice`), cast and written before the next one is
read: peak memory is about one tensor, whatever the model size.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from trtc.converters import architecture_for
from trtc.converters.hf_checkpoint import TOKENIZER_FILES, TOKENIZER_MODEL_FILES, HFCheckpoint
from trtc.converters.quantized import (
    TensorSource,
    ignorable,
    read_format,
    tensor_sources,
)
from trtc.converters.tp import shard_for, validate_quantized_split
from trtc.converters.weight_map import WeightMap
from trtc.errors import TrtcError
from trtc.formats.checkpoint import (
    DTYPES,
    CheckpointConfig,
    dtype_name,
    rank_file,
    torch_dtype,
)
from trtc.formats.mapping import Mapping
from trtc.formats.quant_layout import checkpoint_dtype
from trtc.utils.atomic_dir import atomic_output_dir, check_output_dir
from trtc.utils.safetensors_writer import SafetensorsWriter

log = logging.getLogger("trtc")


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

    A pre-quantized model (ModelOpt export, GPTQ) becomes a quantized checkpoint
    (trtc/formats/quant_layout.py); `dtype` is then the dtype of the unquantized tensors.
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
    fmt = read_format(hf, graph, arch.weights)
    quant = fmt.quant
    validate_quantized_split(graph, mapping, quant)
    shapes = graph.weight_shapes(quant)
    sources = tensor_sources(fmt, hf, arch.weights, shapes)
    _check_tensors(hf, arch.weights, sources, lambda name: ignorable(fmt, hf, name))
    out_dtype = resolve_dtype(dtype, hf.config, hf, arch.weights.source("embedding.weight"))
    config = CheckpointConfig(graph=graph, mapping=mapping, dtype=dtype_name(out_dtype),
                              quantization=quant.to_dict() if quant else None)
    dtypes = {name: checkpoint_dtype(name, out_dtype, quant) for name in sources}

    bar = tqdm(total=len(sources) * tp_size, desc="convert", unit="tensor", disable=_disable(progress))
    with bar, atomic_output_dir(output_dir, overwrite) as tmp:
        config.save(tmp)
        for rank in range(tp_size):
            shards = {name: shard_for(name, graph, mapping, rank, quant) for name in sources}
            entries = [(name, dtypes[name], shards[name].shape(shapes[name])) for name in sources]
            with SafetensorsWriter(rank_file(tmp, rank), entries, {"format": "pt"}) as writer:
                for name, source in sources.items():
                    s = shards[name]
                    t = source.read(hf, s).to(dtypes[name])
                    if s.dim is not None and t.shape[s.dim] < s.stop - s.start:  # vocab padding
                        pad = [0, 0] * (t.dim() - 1 - s.dim) + [0, s.stop - s.start - t.shape[s.dim]]
                        t = F.pad(t, pad)
                    writer.write(name, t)
                    bar.update()
        _copy_tokenizer(model_dir, tmp / "tokenizer")
    return output_dir


def _check_tensors(
    hf: HFCheckpoint, weights: WeightMap, sources: dict[str, TensorSource], may_skip: Callable[[str], bool]
) -> None:
    """Check every HF tensor the sources read (presence, shape) and that none is left over."""
    used: set[str] = set()
    for source in sources.values():
        for src, shape in source.hf_shapes.items():
            if src not in hf:
                raise TrtcError(f"tensor {src} is missing from the weights in {hf.model_dir}; the checkpoint does not match config.json")
            got = hf.shape(src)
            if got != shape:
                raise TrtcError(
                    f"tensor {src} has shape {list(got)} but config.json implies {list(shape)}; "
                    "the weights and config.json disagree, fix config.json or re-download"
                )
            used.add(src)
    for name in hf.names():
        if name in used or weights.is_unused(name) or may_skip(name):
            continue
        target = weights.target(name)
        # a mapped tensor of a module the graph does not have (the LM head of a model with tied
        # embeddings) is dropped
        if target is not None and not target.startswith("layers.") and not any(t.startswith(target.rsplit(".", 1)[0] + ".") for t in sources):
            continue
        raise TrtcError(
            f"tensor {name} in {hf.model_dir} is not used by the {hf.config['architectures'][0]} "
            "converter; the checkpoint does not match its architecture"
        )


def _copy_tokenizer(model_dir: Path, dest: Path) -> None:
    if not any((model_dir / name).is_file() for name in TOKENIZER_MODEL_FILES):
        log.warning(f"warning: {model_dir} has no tokenizer ({', '.join(TOKENIZER_MODEL_FILES)}): its engine will take "
                    "token ids only, and `trtc run` / `trtc eval` need text; add the model's tokenizer files and "
                    "convert again")
    dest.mkdir()
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, dest / name)
    # AutoTokenizer picks the tokenizer class from the model type when tokenizer_config.json does
    # not name one, so the HF config travels with the tokenizer.
    shutil.copyfile(model_dir / "config.json", dest / "config.json")


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress
