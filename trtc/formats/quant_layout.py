"""The trtc quantized layout: what a quantized checkpoint holds, read by the reference GEMMs here
and, as is, by the GPU kernels (build may repack later).

checkpoint config.json `quantization` (TensorRT-LLM's names):
    {"quant_algo": "FP8" | "W4A16_AWQ" | "W4A16_GPTQ" | null, "kv_cache_quant_algo": "FP8" | null,
     "group_size": 128, "has_zero_point": false, "has_input_perm": false, "weight_scale_per_channel": false,
     "exclude_modules": ["lm_head", ...], "producer": {...}, "calibration": {...}}
    `exclude_modules` names trtc modules kept in the model dtype; the embedding and the LM head
    are never quantized.

The quantized linear layers are attention q/k/v/o and MLP gate/up/down of every layer (of a
mixture of experts: the experts' and the shared expert's gate/up/down; the router stays). A linear X
(weights [out, in] before quantization) holds, instead of the model-dtype `X.weight`:

FP8 (W8A8, per-tensor scales):
    X.weight        float8_e4m3fn [out, in]
    X.weight_scale  float32 []         w ~= X.weight * weight_scale ([out] in a fused engine layer);
                                       [out] (one per output channel) with weight_scale_per_channel,
                                       as compressed-tensors' channel strategy writes it
    X.input_scale   float32 []         static activation scale
    y = (fp8(x / input_scale) @ X.weight^T) * (input_scale * weight_scale)   (fp32 accumulate)
    where fp8(v) clamps v to +-448 and rounds to float8_e4m3fn.
    Fused qkv / gate_up (engine): the parts' weights concatenated unchanged, weight_scale float32
    [out] (each part's scale over its rows: a per-output-channel epilogue scale), one input_scale,
    the max of the parts' (ModelOpt's export already makes them equal). Not one scale with the
    parts requantized to the max: that moved books-16M's perplexity by 0.4-0.5% (compiler/layout.py).

INT4 weight-only (W4A16, AWQ and GPTQ), groups of `group_size` input columns:
    X.weight          uint8 [out, in / 2]: two 4-bit values per byte, the low nibble is the even
                      input column, the high nibble the odd one; values u in [0, 15]
    X.weight_scale    float32 [out, in / group_size]
    X.weight_zero     uint8 [out, in / group_size], only with has_zero_point (asymmetric);
                      without it the zero point is 8 (symmetric: u - 8 in [-8, 7])
    X.pre_quant_scale float32 [in], optional, per layer (AWQ): x * pre_quant_scale before the GEMM.
                      ModelOpt's export folds the one of q/k/v and gate/up into the norm before
                      them, so only o and down carry one there.
    X.input_perm      int32 [in], only with has_input_perm (GPTQ act-order): the weight's columns
                      are sorted by group, so groups are contiguous; x is gathered x[..., perm]
    w[o, c] = (u[o, c] - zero[o, c // g]) * scale[o, c // g];   y = x' @ w^T in the model dtype
    Fused qkv / gate_up (engine): weight, weight_scale, weight_zero concatenated along out;
    pre_quant_scale and input_perm must be equal across the shards and are kept once.

Experts (`layers.{i}.mlp.experts.{gate,up,down}`) stack E such linears: every tensor above with E
in front (FP8: weight [E, out, in], weight_scale and input_scale [E], one per expert; INT4: weight
uint8 [E, out, in / 2], weight_scale [E, out, in / group_size], pre_quant_scale [E, in]).
Fused gate_up [E, 2I, in] (engine): weights concatenated along the rows of each expert, FP8
weight_scale [E, 2I] (each part's scale over its rows), input_scale [E] the max of the parts';
INT4 weight_scale [E, 2I, in / group_size], pre_quant_scale [E, in] kept once (equal for gate and up).

FP8 KV cache (kv_cache_quant_algo FP8):
    layers.{i}.attention.k_cache_scale, layers.{i}.attention.v_cache_scale  float32 []
    the pool stores fp8(k / k_cache_scale) as float8_e4m3fn; attention reads k * k_cache_scale.

Tensor parallelism splits these with their layer (converters/tp.py): column-parallel layers split
weight / weight_scale / weight_zero by rows and keep pre_quant_scale and input_perm whole;
row-parallel layers split the packed weight by bytes, the group tensors by groups and
pre_quant_scale by columns. Per-tensor scales are replicated.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from trtc.errors import TrtcError

QUANT_ALGOS = ("FP8", "W4A16_AWQ", "W4A16_GPTQ")
KV_CACHE_QUANT_ALGOS = ("FP8",)
GROUP_SIZES = (32, 64, 128)
FP8_MAX = 448.0  # largest float8_e4m3fn
FP8 = torch.float8_e4m3fn

# the quantized linear layers of a decoder layer (trtc module names under layers.{i}.)
LINEARS = ("attention.q", "attention.k", "attention.v", "attention.o", "mlp.gate", "mlp.up", "mlp.down",
           "mlp.experts.gate", "mlp.experts.up", "mlp.experts.down", "mlp.shared.gate", "mlp.shared.up", "mlp.shared.down")


@dataclass
class QuantConfig:
    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    group_size: int = 128
    has_zero_point: bool = False
    has_input_perm: bool = False
    weight_scale_per_channel: bool = False  # FP8: weight_scale [out] instead of []
    exclude_modules: list[str] = field(default_factory=list)
    producer: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.quant_algo is not None and self.quant_algo not in QUANT_ALGOS:
            raise TrtcError(f"quant_algo {self.quant_algo!r} is not supported; supported: {', '.join(QUANT_ALGOS)}")
        if self.kv_cache_quant_algo is not None and self.kv_cache_quant_algo not in KV_CACHE_QUANT_ALGOS:
            raise TrtcError(
                f"kv_cache_quant_algo {self.kv_cache_quant_algo!r} is not supported; supported: "
                f"{', '.join(KV_CACHE_QUANT_ALGOS)}"
            )
        if self.is_int4 and self.group_size not in GROUP_SIZES:
            raise TrtcError(
                f"INT4 group size {self.group_size} is not supported; use one of: {', '.join(map(str, GROUP_SIZES))}"
            )

    @property
    def is_fp8(self) -> bool:
        return self.quant_algo == "FP8"

    @property
    def is_int4(self) -> bool:
        return self.quant_algo in ("W4A16_AWQ", "W4A16_GPTQ")

    @property
    def kv_cache_fp8(self) -> bool:
        return self.kv_cache_quant_algo == "FP8"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> QuantConfig | None:
        """None for an unquantized checkpoint (config `quantization` null or all algorithms null)."""
        if not d or (d.get("quant_algo") is None and d.get("kv_cache_quant_algo") is None):
            return None
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def quantizes(self, layer: int, module: str) -> bool:
        """Whether linear `module` (one of LINEARS) of `layer` is quantized."""
        return self.quant_algo is not None and f"layers.{layer}.{module}" not in self.exclude_modules

    def linear_tensors(self, prefix: str, out: int, inp: int) -> dict[str, tuple[int, ...]]:
        """The tensors (name -> shape) of quantized linear `prefix`, bias excluded."""
        if self.is_fp8:
            scale = (out,) if self.weight_scale_per_channel else ()
            return {prefix + ".weight": (out, inp), prefix + ".weight_scale": scale, prefix + ".input_scale": ()}
        if inp % self.group_size:
            raise TrtcError(
                f"{prefix} has {inp} input features, not a multiple of the INT4 group size {self.group_size}; "
                "use a group size (--group_size) that divides it"
            )
        groups = inp // self.group_size
        shapes = {prefix + ".weight": (out, inp // 2), prefix + ".weight_scale": (out, groups)}
        if self.has_zero_point:
            shapes[prefix + ".weight_zero"] = (out, groups)
        shapes[prefix + ".pre_quant_scale"] = (inp,)
        if self.has_input_perm:
            shapes[prefix + ".input_perm"] = (inp,)
        return shapes

    @staticmethod
    def is_optional(name: str) -> bool:
        """Tensors a checkpoint may lack (then the layer does without)."""
        return name.endswith(".pre_quant_scale")


_LINEAR_WEIGHT = re.compile(r"layers\.(\d+)\.(.+)\.weight")
_FLOAT32_SUFFIXES = ("weight_scale", "input_scale", "pre_quant_scale", "k_cache_scale", "v_cache_scale")


def checkpoint_dtype(name: str, model_dtype: torch.dtype | None, quant: QuantConfig | None) -> torch.dtype | None:
    """The dtype of checkpoint tensor `name`: the model dtype unless this layout says otherwise."""
    if quant is None:
        return model_dtype
    m = _LINEAR_WEIGHT.fullmatch(name)
    if m and m.group(2) in LINEARS and quant.quantizes(int(m.group(1)), m.group(2)):
        return FP8 if quant.is_fp8 else torch.uint8
    suffix = name.rsplit(".", 1)[-1]
    if suffix in _FLOAT32_SUFFIXES:
        return torch.float32
    if suffix == "weight_zero":
        return torch.uint8
    if suffix == "input_perm":
        return torch.int32
    return model_dtype


# INT4 packing ---------------------------------------------------------------------------------------
def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """u: [out, in] integers in [0, 15] -> uint8 [out, in / 2], low nibble = even column."""
    u = u.to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in / 2] -> uint8 [out, in] values in [0, 15]."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


# FP8 ------------------------------------------------------------------------------------------------
def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8(x / scale): float32 division, clamped to the e4m3 range (torch's cast does not saturate)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def in_model_dtype(name: str, quant: QuantConfig | None) -> bool:
    """Whether checkpoint tensor `name` is held in the model dtype (not a quantized weight or a scale)."""
    return checkpoint_dtype(name, None, quant) is None
