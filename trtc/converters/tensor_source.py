"""What an importer of a pre-quantized HF checkpoint yields: its source format and, for every trtc
tensor, a `TensorSource` (the HF tensors it consumes, so that leftovers are still an error, their
expected shapes, and a reader of one tensor-parallel shard in trtc coordinates). Shared by the
ModelOpt / GPTQ importer (quantized.py) and the compressed-tensors one (compressed_tensors.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trtc.converters.hf_checkpoint import HFCheckpoint
from trtc.converters.tp import Shard
from trtc.converters.weight_map import WeightMap
from trtc.errors import TrtcError
from trtc.formats.graph import ModelGraph, layer_linears
from trtc.formats.quant_layout import QuantConfig

EXPERT = "{e}"  # the expert index in a weight map's entry of an expert stack (converters/moe.py)
QUANTIZED_WEIGHT_DTYPES = ("F8_E4M3", "U8", "I8")


@dataclass
class TensorSource:
    hf_shapes: dict[str, tuple[int, ...]]  # the HF tensors consumed, with their expected shapes
    read: Callable[[HFCheckpoint, Shard], torch.Tensor]  # one shard, in trtc coordinates


def plain(src: str, shape: tuple[int, ...]) -> TensorSource:
    return TensorSource({src: shape}, lambda hf, s: hf.read(src, s.dim, s.start, s.stop))


# Reading the quantization config --------------------------------------------------------------------
@dataclass
class SourceFormat:
    kind: str  # "plain" | "modelopt" | "gptq" | "compressed-tensors" (converters/compressed_tensors.py)
    quant: QuantConfig | None
    gptq_v1_zeros: bool = False  # AutoGPTQ's checkpoint_format "gptq" stores zero points minus one


def unquantized_linears(hf: HFCheckpoint, graph: ModelGraph, weights: WeightMap, algo: str | None, marker: str) -> list[str]:
    """The layer linears the checkpoint keeps in a float dtype (trtc names)."""
    if algo is None:
        return []
    out = []
    for i, layer in enumerate(graph.layers):
        for module in layer_linears(layer):
            src = f"{weights.source_module(f'layers.{i}.{module}')}.{marker}".replace(EXPERT, "0")
            quantized = src in hf and (marker != "weight" or hf.dtype(src) in QUANTIZED_WEIGHT_DTYPES)
            if not quantized:
                out.append(f"layers.{i}.{module}")
    return out


def check_lm_head(hf: HFCheckpoint, weights: WeightMap, marker: str) -> None:
    src = f"{weights.source_module('lm_head')}.{marker}"
    if src in hf and (marker != "weight" or hf.dtype(src) in QUANTIZED_WEIGHT_DTYPES):
        raise TrtcError(f"{hf.model_dir} has a quantized LM head ({src}); trtc keeps the LM head unquantized, re-export it excluded")


# Tensor sources ---------------------------------------------------------------------------------------


def read_int4_words(hf: HFCheckpoint, src: str, s: Shard, out_axis: int, what: str) -> torch.Tensor:
    """An int32 tensor packing eight 4-bit values per word along the input features, read for shard
    `s` of trtc's packed uint8 [out, in/2] (its rows, or its bytes of columns: four per word).
    out_axis: the stored tensor's axis of the output features (the other holds the words)."""
    if s.dim == 0:
        q = hf.read(src, out_axis, s.start, s.stop)
    elif s.dim == 1:
        if s.start % 4 or s.stop % 4:
            raise TrtcError(f"{src}: a tensor-parallel shard must hold a multiple of 8 input columns")
        q = hf.read(src, 1 - out_axis, s.start // 4, s.stop // 4)
    else:
        q = hf.read(src)
    if q.dtype != torch.int32:
        raise TrtcError(f"{src} is {q.dtype}, not int32; {what} packs eight 4-bit values per int32")
    return q
