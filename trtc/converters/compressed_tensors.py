"""compressed-tensors checkpoints (what llm-compressor writes; config.json `quantization_config`
with quant_method "compressed-tensors") -> the trtc quantized layout (trtc/formats/quant_layout.py).

Two schemes run, whatever the config groups' targets, as long as every group has the same one:
  * FP8 W8A8, format "float-quantized" (or "naive-quantized"): `weight` float8_e4m3fn [out, in],
    `weight_scale` [1] (strategy tensor) or [out, 1] (strategy channel), `input_scale` [1]
    (static per-tensor activations). -> trtc FP8, weight_scale [] or [out] (weight_scale_per_channel).
  * W4A16, format "pack-quantized", strategy group: `weight_packed` int32 [out, in/8], eight 4-bit
    values per word along `in`, the low nibble first, each stored as q + 8 (so unsigned, in [0, 15]:
    its little-endian bytes are trtc's packed uint8 [out, in/2] as they are); `weight_scale`
    [out, in/group]; `weight_shape` [2] = (out, in); asymmetric: `weight_zero_point` int32
    [out/8, in/group], eight zero points per word along `out`, each stored as zp + 8.
    w = (q - zp) * scale = (u - (zp + 8)) * scale: trtc's W4A16 with weight_zero = zp + 8
    (symmetric: the implicit zero point 8).
Which linears are quantized is read from the tensors (a `weight_packed`, an F8_E4M3 `weight`), not
from the groups' targets and `ignore` patterns. Anything else (dynamic or per-token activations,
INT8, FP4, block or act-order group scales, a KV-cache scheme, several schemes) is refused in one
line naming it. Layout moves only: no value is recomputed.
"""

from __future__ import annotations

import torch

from trtc.converters.hf_checkpoint import HFCheckpoint
from trtc.converters.tensor_source import (
    SourceFormat,
    TensorSource,
    check_lm_head,
    plain,
    read_int4_words,
    unquantized_linears,
)
from trtc.converters.tp import Shard
from trtc.converters.weight_map import WeightMap
from trtc.errors import TrtcError
from trtc.formats.graph import ModelGraph
from trtc.formats.quant_layout import QuantConfig

FP8_FORMATS = ("float-quantized", "naive-quantized")
INT4_FORMAT = "pack-quantized"
SUPPORTED = "FP8 W8A8 with static per-tensor activations (float-quantized) and W4A16 group (pack-quantized)"


def describe(group: dict) -> str:
    """A config group's scheme in words: 'weights int4 group 128 asymmetric, activations float8 token dynamic'."""

    def args(a: dict | None) -> str:
        if not a:
            return "none"
        kind = "float" if a.get("type") == "float" else "int"
        strategy = a.get("strategy") or "?"
        if a.get("group_size"):
            strategy += f" {a['group_size']}"
        extra = [] if a.get("symmetric", True) else ["asymmetric"]
        extra += ["dynamic"] if a.get("dynamic") else []
        extra += [f"actorder {a['actorder']}"] if a.get("actorder") else []
        return " ".join([f"{kind}{a.get('num_bits')}", strategy, *extra])

    return f"weights {args(group.get('weights'))}, activations {args(group.get('input_activations'))}"


def ct_format(qc: dict, hf: HFCheckpoint, graph: ModelGraph, weights: WeightMap) -> SourceFormat:
    where = f"compressed-tensors checkpoint {hf.model_dir}"
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise TrtcError(f"{where} has no config_groups in its quantization_config; re-export it with llm-compressor")
    schemes = {describe(g) for g in groups.values() if isinstance(g, dict)}
    if len(schemes) != 1:
        raise TrtcError(f"{where} mixes schemes ({'; '.join(sorted(schemes))}); trtc runs one scheme per model: {SUPPORTED}")
    group = next(iter(groups.values()))
    scheme, fmt = describe(group), group.get("format") or qc.get("format")
    if qc.get("kv_cache_scheme"):
        raise TrtcError(f"{where} has a KV-cache scheme ({qc['kv_cache_scheme']}), which trtc does not import; "
                        "export it without kv_cache_scheme, or use `trtc quantize --kv_cache_dtype fp8`")
    if qc.get("quantization_status", "compressed") != "compressed" or qc.get("sparsity_config"):
        raise TrtcError(f"{where} is not a compressed dense checkpoint (quantization_status "
                        f"{qc.get('quantization_status')!r}, sparsity {bool(qc.get('sparsity_config'))}); save it compressed")
    w, a = group.get("weights") or {}, group.get("input_activations")
    if fmt in FP8_FORMATS and _is_fp8_static(w, a):
        quant = QuantConfig(quant_algo="FP8", weight_scale_per_channel=w.get("strategy") == "channel",
                            exclude_modules=unquantized_linears(hf, graph, weights, "FP8", "weight"),
                            producer=_producer(qc, fmt))
        check_lm_head(hf, weights, "weight")
        return SourceFormat("compressed-tensors", quant)
    if fmt == INT4_FORMAT and _is_w4a16_group(w, a):
        quant = QuantConfig(quant_algo="W4A16_GPTQ", group_size=int(w["group_size"]),
                            has_zero_point=not w.get("symmetric", True),
                            exclude_modules=unquantized_linears(hf, graph, weights, "W4A16_GPTQ", "weight_packed"),
                            producer=_producer(qc, fmt))
        check_lm_head(hf, weights, "weight_packed")
        return SourceFormat("compressed-tensors", quant)
    raise TrtcError(f"{where}: scheme '{scheme}' (format {fmt}) is not supported; trtc imports {SUPPORTED}")


def _is_fp8_static(w: dict, a: dict | None) -> bool:
    return (w.get("type") == "float" and w.get("num_bits") == 8 and w.get("strategy") in ("tensor", "channel")
            and w.get("symmetric", True) and not w.get("dynamic") and a is not None and a.get("type") == "float"
            and a.get("num_bits") == 8 and a.get("strategy") == "tensor" and not a.get("dynamic")
            and a.get("symmetric", True))


def _is_w4a16_group(w: dict, a: dict | None) -> bool:
    return (w.get("type") == "int" and w.get("num_bits") == 4 and w.get("strategy") == "group"
            and isinstance(w.get("group_size"), int) and not w.get("dynamic") and w.get("actorder") in (None, "weight")
            and a is None)


def _producer(qc: dict, fmt: str) -> dict:
    return {"name": "compressed-tensors", "version": qc.get("version"), "format": fmt}


# Tensor sources ---------------------------------------------------------------------------------------
def ct_source(hf_module: str, suffix: str, shape: tuple[int, ...], quant: QuantConfig) -> TensorSource | None:
    """The source of trtc tensor `suffix` of a quantized linear whose HF module is `hf_module`."""
    if suffix == "pre_quant_scale":
        return None
    if quant.is_fp8:
        src = f"{hf_module}.{suffix}"
        if suffix == "weight":
            return plain(src, shape)
        stored = (shape[0], 1) if shape else (1,)  # [out, 1] per channel, [1] per tensor
        return TensorSource({src: stored}, lambda h, s: plain(src, stored).read(h, s).reshape(s.shape(shape)))
    if suffix == "weight":
        out, half = shape
        hf_shapes = {f"{hf_module}.weight_packed": (out, half // 4), f"{hf_module}.weight_shape": (2,)}
        return TensorSource(hf_shapes, lambda h, s: _packed_weight(h, hf_module, (out, 2 * half), s))
    if suffix == "weight_scale":
        return plain(f"{hf_module}.weight_scale", shape)
    if suffix == "weight_zero":
        out, groups = shape
        src = f"{hf_module}.weight_zero_point"
        return TensorSource({src: (out // 8, groups)}, lambda h, s: _zero_points(h, src, s))
    raise TrtcError(f"compressed-tensors checkpoint: unexpected tensor {hf_module}.{suffix}")


def _packed_weight(hf: HFCheckpoint, hf_module: str, shape: tuple[int, int], s: Shard) -> torch.Tensor:
    """weight_packed int32 [out, in/8] -> trtc uint8 [out, in/2] (the shard: rows, or bytes of columns)."""
    src = f"{hf_module}.weight_packed"
    stored = tuple(int(v) for v in hf.read(f"{hf_module}.weight_shape"))
    if stored != shape:
        raise TrtcError(f"{hf_module}.weight_shape is {list(stored)} but config.json implies {list(shape)}; "
                        "the weights and config.json disagree")
    q = read_int4_words(hf, src, s, 0, "a pack-quantized weight")  # [out, in/8]
    return q.contiguous().view(torch.uint8)  # [out, in/2]: little-endian bytes, low nibble = even column


def _zero_points(hf: HFCheckpoint, src: str, s: Shard) -> torch.Tensor:
    """weight_zero_point int32 [out/8, groups] (zp + 8, packed along out) -> uint8 [out, groups]."""
    if s.dim == 0:
        if s.start % 8 or s.stop % 8:
            raise TrtcError(f"{src}: a tensor-parallel shard must hold a multiple of 8 output rows")
        q = hf.read(src, 0, s.start // 8, s.stop // 8)
    else:
        q = hf.read(src, 1 if s.dim == 1 else None, s.start, s.stop)
    b = q.T.contiguous().view(torch.uint8)  # [groups, out/2]
    z = torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2)  # [groups, out]
    return z.T.contiguous()
