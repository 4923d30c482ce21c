"""The ops of the `trtc` ONNX domain: what TensorRT has no native layer for.

One table is the source of truth for the lowering (node attributes), the `plugins.json` written
beside the graphs, the onnxruntime check (Python custom ops) and the TensorRT plugins
(`trtc/backends/tensorrt/plugins.py`, plugin id `trtc::{name}`). A node carries the attribute
`plugin_namespace = "trtc"`, by which TensorRT's ONNX parser maps it onto the plugin of that name.

Shapes: T tokens of the step, B sequences, H* heads, D head dim, N blocks of P tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

DOMAIN = "trtc"
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "trtc"


@dataclass(frozen=True)
class Port:
    name: str
    dtype: str  # "activation" (the model dtype), "kv" (the pool's), or an ONNX type name
    shape: str


@dataclass(frozen=True)
class Attribute:
    name: str
    type: str  # int | float
    doc: str


@dataclass(frozen=True)
class OpSpec:
    name: str
    doc: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    attributes: tuple[Attribute, ...]
    aliases: dict[int, int] = field(default_factory=dict)  # output index -> the input it updates in place
    reference: str = ""  # the function that defines it (trtc/onnx/torch_ops.py)

    @property
    def plugin_id(self) -> str:
        return f"{PLUGIN_NAMESPACE}::{self.name}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(domain=DOMAIN, version=DOMAIN_VERSION, plugin_id=self.plugin_id,
                 aliases={str(k): v for k, v in self.aliases.items()})
        return d


PAGED_ATTENTION = OpSpec(
    name="PagedAttention",
    doc="RoPE on q and k, the write of k and v into the paged KV-cache pool at slot_mapping, then causal "
        "attention of each sequence's new queries over its cached keys through its block table (GQA, "
        "sliding window, soft-cap; an FP8 pool stores fp8(k / k_scale), fp8(v / v_scale)). Prefill chunks "
        "and decode tokens mix in one step. The pool is updated in place: output 1 aliases input 3.",
    inputs=(
        Port("qkv", "activation", "[T, (Hq + 2 Hkv) D] q, k, v of the fused qkv GEMM (after q/k norm, before RoPE)"),
        Port("rope_cos", "activation", "[T, R] cos of each token's rotary angles (R < D: partial rotary, the first R dims)"),
        Port("rope_sin", "activation", "[T, R] sin of each token's rotary angles"),
        Port("kv_cache_pool", "kv", "[2, N, P, Hkv, D] this layer's K (index 0) and V (index 1) blocks"),
        Port("k_scale", "FLOAT", "[] dequantization scale of an FP8 pool's K (1 otherwise, unused)"),
        Port("v_scale", "FLOAT", "[] dequantization scale of an FP8 pool's V (1 otherwise, unused)"),
        Port("slot_mapping", "INT64", "[T] pool slot (block * P + offset) each new token's K/V goes to"),
        Port("block_tables", "INT32", "[B, max_blocks] block ids of each sequence, -1 padded"),
        Port("context_lens", "INT32", "[B] cached + new tokens of each sequence"),
        Port("query_start_loc", "INT32", "[B + 1] offsets of each sequence's new tokens in T, from 0"),
    ),
    outputs=(
        Port("attn_out", "activation", "[T, Hq D]"),
        Port("present_kv_cache_pool", "kv", "[2, N, P, Hkv, D] the pool with this step's K/V written"),
    ),
    attributes=(
        Attribute("num_heads", "int", "query heads of this rank (Hq)"),
        Attribute("num_kv_heads", "int", "KV heads of this rank (Hkv)"),
        Attribute("head_dim", "int", "D"),
        Attribute("tokens_per_block", "int", "P"),
        Attribute("scale", "float", "softmax scale"),
        Attribute("sliding_window", "int", "a query sees the last sliding_window positions, itself included; 0: all"),
        Attribute("soft_cap", "float", "logits -> cap * tanh(logits / cap); 0: none"),
    ),
    aliases={1: 3},
    reference="trtc.onnx.torch_ops.paged_attention",
)

FP8_GEMM = OpSpec(
    name="Fp8Gemm",
    doc="W8A8 FP8 GEMM: y = (fp8(x / input_scale) @ weight^T) * (input_scale * weight_scale), float32 "
        "accumulation, fp8 saturating at +-448; y in x's dtype (trtc/formats/quant_layout.py).",
    inputs=(
        Port("x", "activation", "[M, in]"),
        Port("weight", "FLOAT8E4M3FN", "[out, in]"),
        Port("weight_scale", "FLOAT", "[] or [out] (fused layers: each part's scale over its rows)"),
        Port("input_scale", "FLOAT", "[] static activation scale"),
    ),
    outputs=(Port("y", "activation", "[M, out]"),),
    attributes=(),
    reference="trtc.onnx.torch_ops.fp8_gemm",
)

W4A16_GEMM = OpSpec(
    name="W4A16Gemm",
    doc="INT4 weight-only GEMM in groups of group_size input columns: w[o, c] = (u[o, c] - zero[o, c // g]) "
        "* scale[o, c // g], y = x @ w^T in x's dtype. AWQ's pre-quant scale and GPTQ's act-order gather "
        "are standard Mul / Gather nodes before it.",
    inputs=(
        Port("x", "activation", "[M, in]"),
        Port("weight", "UINT8", "[out, in / 2] two 4-bit values per byte, low nibble = even column"),
        Port("weight_scale", "FLOAT", "[out, in / group_size]"),
        Port("weight_zero", "UINT8", "[out, in / group_size], or [] holding 8 for symmetric quantization"),
    ),
    outputs=(Port("y", "activation", "[M, out]"),),
    attributes=(Attribute("group_size", "int", "input columns per scale"),),
    reference="trtc.onnx.torch_ops.w4a16_gemm",
)

ALL_REDUCE = OpSpec(
    name="AllReduce",
    doc="Sum of x over the tensor-parallel ranks (NCCL); only in graphs of tp > 1.",
    inputs=(Port("x", "activation", "[T, hidden] this rank's partial result"),),
    outputs=(Port("y", "activation", "[T, hidden]"),),
    attributes=(Attribute("tp_size", "int", "ranks"), Attribute("rank", "int", "this rank")),
    reference="trtc.onnx.torch_ops.all_reduce",
)

ALL_GATHER = OpSpec(
    name="AllGather",
    doc="Concatenation of x over the tensor-parallel ranks along the last axis, in rank order (the "
        "vocab-parallel LM head); only in graphs of tp > 1.",
    inputs=(Port("x", "FLOAT", "[S, local_vocab]"),),
    outputs=(Port("y", "FLOAT", "[S, tp local_vocab]"),),
    attributes=(Attribute("tp_size", "int", "ranks"), Attribute("rank", "int", "this rank")),
    reference="trtc.onnx.torch_ops.all_gather",
)

MOE = OpSpec(
    name="MoE",
    doc="The experts of a mixture of experts: y[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x[t])) * "
        "up_e(x[t])), e = topk_ids[t, j], each expert a gated MLP from the stacked weights (tokens grouped by "
        "expert, one grouped GEMM for gate_up and one for down: trtc/plugins/moe). The router (Gemm, Softmax, "
        "TopK, renormalisation) is standard ops before it. FP8 experts (weights float8e4m3fn) are W8A8 per "
        "expert as Fp8Gemm; model-dtype experts take scalar 1 scales, unused. E experts of I rows on this rank.",
    inputs=(
        Port("x", "activation", "[T, hidden]"),
        Port("topk_weights", "FLOAT", "[T, k] each token's experts' weights"),
        Port("topk_ids", "INT64", "[T, k] each token's experts"),
        Port("gate_up", "activation or FLOAT8E4M3FN", "[E, 2I, hidden] each expert's gate rows then up rows"),
        Port("gate_up_scale", "FLOAT", "FP8: [E, 2I] per-row weight scales; else [] (1)"),
        Port("gate_up_input_scale", "FLOAT", "FP8: [E] each expert's activation scale; else [] (1)"),
        Port("down", "activation or FLOAT8E4M3FN", "[E, hidden, I]"),
        Port("down_scale", "FLOAT", "FP8: [E]; else [] (1)"),
        Port("down_input_scale", "FLOAT", "FP8: [E]; else [] (1)"),
    ),
    outputs=(Port("y", "activation", "[T, hidden] this rank's partial sum (all-reduced after, as down)"),),
    attributes=(),
    reference="trtc.onnx.torch_ops.moe",
)

OPS = {op.name: op for op in (PAGED_ATTENTION, FP8_GEMM, W4A16_GEMM, ALL_REDUCE, ALL_GATHER, MOE)}
