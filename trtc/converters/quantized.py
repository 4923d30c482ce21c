"""Pre-quantized HF checkpoints -> the trtc quantized layout (trtc/formats/quant_layout.py).

Source formats, told apart by the files of the HF directory (compressed-tensors checkpoints, what
llm-compressor writes, are read by the sibling converters/compressed_tensors.py):
  * ModelOpt's unified HF export (`hf_quant_config.json`, or config.json `quantization_config`
    with quant_method "modelopt"): FP8 (`weight` float8_e4m3fn, `weight_scale`, `input_scale`),
    W4A16_AWQ (`weight` uint8 packing two output rows per byte, signed nibbles; `weight_scale`
    [out, in/group]; `pre_quant_scale`), FP8 KV cache (`k_proj.k_scale`, `v_proj.v_scale`).
    `trtc quantize` writes this format with ModelOpt and imports it here.
  * GPTQ (AutoGPTQ / GPTQModel, config.json `quantization_config` with quant_method "gptq"):
    `qweight` int32 [in/8, out] (eight nibbles along in), `scales` [in/group, out], `qzeros`
    int32 [in/group, out/8] (stored minus one in checkpoint_format "gptq", as is in "gptq_v2"),
    `g_idx` [in] (act-order when desc_act).

Every trtc tensor gets a `TensorSource`: the HF tensors it consumes (so that leftovers are still
an error), their expected shapes, and a reader of one tensor-parallel shard (in trtc coordinates).
Packing conversions are layout moves only: no value is recomputed.
"""

from __future__ import annotations

import json

import torch

from trtc.converters.compressed_tensors import ct_format, ct_source
from trtc.converters.hf_checkpoint import HFCheckpoint
from trtc.converters.tensor_source import (
    EXPERT,
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
from trtc.formats.quant_layout import LINEARS, QuantConfig, pack_int4

MODELOPT_ALGOS = {"FP8": "FP8", "W4A16_AWQ": "W4A16_AWQ", "W4A16_GPTQ": "W4A16_GPTQ"}


def read_format(hf: HFCheckpoint, graph: ModelGraph, weights: WeightMap) -> SourceFormat:
    """The quantization of an HF directory (none, ModelOpt or GPTQ), one-line errors otherwise."""
    path = hf.model_dir / "hf_quant_config.json"
    qc = hf.config.get("quantization_config")
    if path.is_file():
        try:
            top = json.loads(path.read_text())
            d = {"producer": top.get("producer"), **top["quantization"]}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise TrtcError(f"{path} is not a valid ModelOpt quantization config ({e}); re-export the model") from None
        return SourceFormat("modelopt", _modelopt_quant(d, hf, graph, weights, path.name))
    if qc is None:
        return SourceFormat("plain", None)
    if not isinstance(qc, dict):
        raise TrtcError(f"config.json quantization_config is not an object; fix config.json in {hf.model_dir}")
    method = qc.get("quant_method")
    if method == "modelopt":
        return SourceFormat("modelopt", _modelopt_quant(qc, hf, graph, weights, "config.json quantization_config"))
    if method == "gptq":
        return _gptq_format(qc, hf, graph, weights)
    if method == "compressed-tensors":
        return ct_format(qc, hf, graph, weights)
    raise TrtcError(
        f"quantization method {method!r} of {hf.model_dir} is not supported; trtc imports ModelOpt exports "
        "(FP8, W4A16_AWQ), GPTQ int4 and compressed-tensors (FP8, W4A16) checkpoints, or quantizes a bf16/fp16 "
        "model itself with `trtc quantize`"
    )


def _modelopt_quant(d: dict, hf: HFCheckpoint, graph: ModelGraph, weights: WeightMap, where: str) -> QuantConfig:
    algo, kv = d.get("quant_algo"), d.get("kv_cache_quant_algo")
    if algo is not None and algo not in MODELOPT_ALGOS:
        raise TrtcError(
            f"{where} of {hf.model_dir} has quant_algo {algo!r}, which trtc does not run; supported: "
            f"{', '.join(MODELOPT_ALGOS)} (re-quantize with `trtc quantize --qformat fp8|int4_awq|int4_gptq`)"
        )
    if kv is not None and kv != "FP8":
        raise TrtcError(f"{where} of {hf.model_dir} has kv_cache_quant_algo {kv!r}; trtc supports FP8 only")
    if d.get("has_zero_point"):
        raise TrtcError(f"{where} of {hf.model_dir}: asymmetric (has_zero_point) ModelOpt INT4 is not supported")
    quant = QuantConfig(
        quant_algo=algo, kv_cache_quant_algo=kv, group_size=int(d.get("group_size") or 128),
        exclude_modules=unquantized_linears(hf, graph, weights, algo, "weight"),
        producer=d.get("producer"), calibration=d.get("calibration"),
    )
    check_lm_head(hf, weights, "weight")
    return quant


def _gptq_format(qc: dict, hf: HFCheckpoint, graph: ModelGraph, weights: WeightMap) -> SourceFormat:
    bits, group = qc.get("bits"), qc.get("group_size")
    if bits != 4:
        raise TrtcError(f"GPTQ checkpoint {hf.model_dir} has {bits}-bit weights; trtc runs 4-bit GPTQ only")
    if not isinstance(group, int) or group <= 0:
        raise TrtcError(
            f"GPTQ checkpoint {hf.model_dir} has group_size {group!r}; trtc needs a positive group size (32, 64 or 128)"
        )
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise TrtcError(f"GPTQ checkpoint_format {fmt!r} of {hf.model_dir} is not supported; supported: gptq, gptq_v2")
    quant = QuantConfig(
        quant_algo="W4A16_GPTQ", group_size=group, has_zero_point=not qc.get("sym", True),
        has_input_perm=bool(qc.get("desc_act", False)),
        exclude_modules=unquantized_linears(hf, graph, weights, "W4A16_GPTQ", "qweight"),
        producer={"name": qc.get("quantizer") or "gptq", "checkpoint_format": fmt},
    )
    check_lm_head(hf, weights, "qweight")
    return SourceFormat("gptq", quant, gptq_v1_zeros=fmt == "gptq")


def tensor_sources(
    fmt: SourceFormat, hf: HFCheckpoint, weights: WeightMap, shapes: dict[str, tuple[int, ...]]
) -> dict[str, TensorSource]:
    """A source for every trtc tensor of `shapes`; optional tensors the checkpoint lacks are left out."""
    sources: dict[str, TensorSource] = {}
    for name, shape in shapes.items():
        if ".experts." in name:  # [E, ...]: one source per expert, stacked
            experts = [_tensor_source(fmt, hf, weights, name, shape[1:], shapes, e) for e in range(shape[0])]
            if experts[0] is not None:
                sources[name] = _stacked(experts)
            continue
        source = _tensor_source(fmt, hf, weights, name, shape, shapes)
        if source is not None:
            sources[name] = source
    return sources


def _stacked(experts: list[TensorSource]) -> TensorSource:
    """The experts' tensors stacked along a new first axis (a shard's dim 1.. is the experts' 0..)."""
    def read(hf: HFCheckpoint, s: Shard) -> torch.Tensor:
        inner = s if s.dim is None else Shard(s.dim - 1, s.start, s.stop)
        return torch.stack([x.read(hf, inner) for x in experts])

    return TensorSource({k: v for x in experts for k, v in x.hf_shapes.items()}, read)


def _tensor_source(fmt: SourceFormat, hf: HFCheckpoint, weights: WeightMap, name: str, shape: tuple[int, ...],
                   shapes: dict[str, tuple[int, ...]], expert: int | None = None) -> TensorSource | None:
    """The source of trtc tensor `name` (of expert `expert` of a stack: its HF module's `{e}` filled;
    else, where the HF checkpoint fuses its module with others, its rows of the fused tensor)."""
    quant = fmt.quant
    module, suffix = name.rsplit(".", 1)

    def source_module(m: str) -> str:
        return weights.source_module(m).replace(EXPERT, str(expert))

    quantized = quant is not None and quant.quant_algo is not None and _is_quantized_linear(module, quant)
    if not quantized or suffix == "bias":
        src = weights.source(name).replace(EXPERT, str(expert))
        if quant is not None and QuantConfig.is_optional(name) and src not in hf:
            return None
        return (_fused_rows(weights, name, shapes) if expert is None else None) or plain(src, shape)
    if fmt.kind == "modelopt":
        fused = _fused_rows(weights, name, shapes, quant) if expert is None else None
        return fused or _modelopt_source(source_module(module), suffix, shape, quant, hf)
    if fmt.kind == "compressed-tensors":
        return ct_source(source_module(module), suffix, shape, quant)
    return _gptq_source(source_module(module), suffix, shape, quant, fmt.gptq_v1_zeros, hf)


def _fused_rows(
    weights: WeightMap, name: str, shapes: dict[str, tuple[int, ...]], quant: QuantConfig | None = None
) -> TensorSource | None:
    """The rows of a fused HF tensor (Phi-3's qkv_proj, gate_up_proj) that trtc tensor `name` holds
    (a tensor stacked along the output rows: weight, bias, an INT4 export's weight_scale), or None
    when its module is not fused. A fused FP8 module's per-tensor scales are shared by its parts
    and read whole; an INT4 export's pre_quant_scale too (per input feature)."""
    module, suffix = name.rsplit(".", 1)
    parts = weights.fused_parts(module)
    int4 = quant is not None and quant.is_int4
    if parts is None or suffix not in ("weight", "bias", *(("weight_scale",) if int4 else ())):
        return None
    rows = [shapes[f"{p}.{suffix}"][0] for p in parts]
    offset, n = sum(rows[: parts.index(module)]), shapes[name][0]
    src = weights.source(name)
    if int4 and suffix == "weight":  # ModelOpt packs two output rows per byte: [out / 2, in]
        full = (sum(rows) // 2, shapes[name][1] * 2)
    else:
        full = (sum(rows), *shapes[name][1:])

    def read(hf: HFCheckpoint, s: Shard) -> torch.Tensor:
        start, stop = (s.start, s.stop) if s.dim == 0 else (0, n)
        rows_shard = Shard(0, offset + start, offset + min(stop, n))
        if int4 and suffix == "weight":
            t = _modelopt_int4(hf, src, rows_shard)
        else:
            t = hf.read(src, 0, rows_shard.start, rows_shard.stop)
        return t if s.dim is None or s.dim == 0 else t.narrow(s.dim, s.start, s.stop - s.start)

    return TensorSource({src: full}, read)


def ignorable(fmt: SourceFormat, hf: HFCheckpoint, name: str) -> bool:
    """An HF tensor that may be left over: AutoGPTQ writes a bias buffer for every quantized linear,
    zeros where the model has none."""
    return fmt.kind == "gptq" and name.endswith(".bias") and not hf.read(name).any()


def _is_quantized_linear(module: str, quant: QuantConfig) -> bool:
    parts = module.split(".", 2)
    return len(parts) == 3 and parts[0] == "layers" and parts[2] in LINEARS and quant.quantizes(int(parts[1]), parts[2])


def _modelopt_source(hf_module: str, suffix: str, shape, quant: QuantConfig, hf: HFCheckpoint) -> TensorSource | None:
    src = f"{hf_module}.{suffix}"
    if suffix == "pre_quant_scale" and src not in hf:
        return None
    if suffix == "weight" and quant.is_int4:
        out, half = shape
        return TensorSource({src: (out // 2, half * 2)}, lambda h, s: _modelopt_int4(h, src, s))
    return plain(src, shape)


def _modelopt_int4(hf: HFCheckpoint, src: str, s: Shard) -> torch.Tensor:
    """ModelOpt packs rows 2r (low nibble) and 2r+1 of column c into byte [r, c], as signed
    nibbles; trtc packs columns along a row with unsigned ones (u = q + 8, the nibble xor 8)."""
    if s.dim == 0:
        packed = hf.read(src, 0, s.start // 2, s.stop // 2)
    elif s.dim == 1:
        packed = hf.read(src, 1, 2 * s.start, 2 * s.stop)
    else:
        packed = hf.read(src)
    rows = torch.stack([packed & 0x0F, packed >> 4], dim=1).flatten(0, 1)  # [out, in] signed nibbles
    return pack_int4(rows ^ 8)


def _gptq_source(hf_module: str, suffix: str, shape, quant: QuantConfig, v1_zeros: bool, hf: HFCheckpoint):
    g = quant.group_size
    if suffix == "pre_quant_scale":
        return None
    if suffix == "weight":
        out, half = shape
        inp = 2 * half
        hf_shapes = {f"{hf_module}.qweight": (inp // 8, out), f"{hf_module}.g_idx": (inp,)}
        if f"{hf_module}.g_idx" not in hf:
            del hf_shapes[f"{hf_module}.g_idx"]
        # qzeros (read by weight_zero when asymmetric) is consumed here either way
        hf_shapes[f"{hf_module}.qzeros"] = (inp // g, out // 8)
        return TensorSource(hf_shapes, lambda h, s: _gptq_weight(h, hf_module, s, quant))
    if suffix == "weight_scale":
        return TensorSource({f"{hf_module}.scales": shape[::-1]},
                            lambda h, s: _read_transposed(h, f"{hf_module}.scales", s))
    if suffix == "weight_zero":
        return TensorSource({}, lambda h, s: _gptq_zeros(h, hf_module, s, v1_zeros))
    if suffix == "input_perm":
        return TensorSource({}, lambda h, s: _gptq_perm(h, hf_module, quant).to(torch.int32))
    raise TrtcError(f"GPTQ checkpoint: unexpected tensor {hf_module}.{suffix}")


def _read_transposed(hf: HFCheckpoint, src: str, s: Shard) -> torch.Tensor:
    """A tensor stored [b, a] read as the trtc tensor [a, b] (shard in trtc coordinates)."""
    dim = None if s.dim is None else 1 - s.dim
    return hf.read(src, dim, s.start, s.stop).T.contiguous()


def _gptq_perm(hf: HFCheckpoint, hf_module: str, quant: QuantConfig) -> torch.Tensor | None:
    """The act-order permutation (columns sorted by group), None without act-order."""
    src = f"{hf_module}.g_idx"
    if not quant.has_input_perm:
        if src in hf:
            g_idx = hf.read(src).long()
            if not torch.equal(g_idx, torch.arange(len(g_idx)) // quant.group_size):
                raise TrtcError(f"{src} is not in order but the GPTQ config has desc_act false; fix quantization_config")
        return None
    if src not in hf:
        raise TrtcError(f"{src} is missing from {hf.model_dir}; an act-order (desc_act) GPTQ checkpoint needs it")
    g_idx = hf.read(src).long()
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], torch.arange(len(g_idx)) // quant.group_size):
        raise TrtcError(f"{src} does not give every group {quant.group_size} columns; the checkpoint is damaged")
    return perm


def _gptq_weight(hf: HFCheckpoint, hf_module: str, s: Shard, quant: QuantConfig) -> torch.Tensor:
    """qweight int32 [in/8, out], nibble j of word [r, o] = column 8r + j: its little-endian bytes
    are already trtc's byte order along `in` (low nibble = even column)."""
    q = read_int4_words(hf, f"{hf_module}.qweight", s, 1, "a GPTQ qweight")  # [in/8, out]
    packed = q.T.contiguous().view(torch.uint8)  # [out, in/2]
    perm = _gptq_perm(hf, hf_module, quant)
    if perm is not None:
        u = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)
        packed = pack_int4(u[:, perm])
    return packed


def _gptq_zeros(hf: HFCheckpoint, hf_module: str, s: Shard, v1: bool) -> torch.Tensor:
    """qzeros int32 [in/group, out/8], nibble j of word [g, r] = zero of row 8r + j."""
    src = f"{hf_module}.qzeros"
    if s.dim == 0:
        if s.start % 8 or s.stop % 8:
            raise TrtcError(f"{src}: a tensor-parallel shard must hold a multiple of 8 output rows")
        q = hf.read(src, 1, s.start // 8, s.stop // 8)
    else:
        q = hf.read(src, 0 if s.dim == 1 else None, s.start, s.stop)
    b = q.contiguous().view(torch.uint8)  # [groups, out/2]
    z = torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2)  # [groups, out]
    if v1:
        z = (z + 1) & 0x0F
    return z.T.contiguous()

