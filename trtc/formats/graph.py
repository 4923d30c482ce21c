"""The layer graph: every architecture normalised into one small vocabulary of layers.

Plain data (dataclasses <-> JSON). Converters produce it from an HF config; the reference forward,
the build stage and the runtime consume it. Tensor names and shapes of a checkpoint follow from it
(`weight_shapes`), so a converter only maps names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trtc.errors import TrtcError

if TYPE_CHECKING:
    from trtc.formats.quant_layout import QuantConfig

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")  # relu2: relu(x)**2
NORM_KINDS = ("rms", "layer")
ROUTER_SCORINGS = ("softmax",)


@dataclass
class RopeConfig:
    """Rotary position embedding of one attention layer (HF `rope_parameters` semantics)."""

    type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0  # linear / dynamic / llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int | None = None  # llama3, longrope
    # longrope: per-frequency divisors, `short_factor` while the sequence is within
    # original_max_position_embeddings, `long_factor` past it (chosen per sequence by its whole length,
    # as HF's generate does: a prompt past it starts long; a sequence that grows past it has its cached
    # keys recomputed with the long factors, trtc/runtime/longrope.py); cos and sin are scaled by attention_factor
    short_factor: list[float] | None = None
    long_factor: list[float] | None = None
    attention_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise TrtcError(
                f"RoPE type {self.type!r} is not supported; supported types: {', '.join(ROPE_TYPES)}"
            )
        if self.type == "llama3" and self.original_max_position_embeddings is None:
            raise TrtcError("llama3 RoPE scaling needs original_max_position_embeddings in rope_scaling")
        if self.type == "longrope" and (self.short_factor is None or self.long_factor is None
                                        or self.original_max_position_embeddings is None):
            raise TrtcError("longrope RoPE scaling needs short_factor, long_factor and original_max_position_embeddings")

    @property
    def long_context(self) -> int | None:
        """LongRoPE: the length past which a sequence uses the long factors (None: another RoPE kind)."""
        return self.original_max_position_embeddings if self.type == "longrope" else None

    @property
    def per_step(self) -> bool:
        """The frequencies depend on the sequence length (dynamic NTK: a table per step; longrope: the
        rows of the short or the long factors per sequence), so decode is not captured as a CUDA graph."""
        return self.type in ("dynamic", "longrope")


@dataclass
class NormConfig:
    kind: str = "rms"  # rms | layer
    eps: float = 1e-6
    offset: float = 0.0  # weight is applied as (offset + w); 1.0 for Gemma-style norms
    bias: bool = False

    def __post_init__(self) -> None:
        if self.kind not in NORM_KINDS:
            raise TrtcError(f"norm kind {self.kind!r} is not supported; supported: {', '.join(NORM_KINDS)}")


@dataclass
class AttentionConfig:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    qk_norm_eps: float = 1e-6
    qk_norm_offset: float = 0.0  # q/k norm weight applied as (offset + w); 1.0 for Gemma 3
    sliding_window: int | None = None  # a query attends to the last `sliding_window` positions, itself included
    soft_cap: float | None = None  # logits -> cap * tanh(logits / cap)
    scale: float | None = None  # None means 1 / sqrt(head_dim)
    use_rope: bool = True  # False: a layer without position embedding (EXAONE 4 global layers)
    rotary_dim: int | None = None  # partial rotary: RoPE on the first rotary_dim dims of a head; None: all

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise TrtcError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads}); fix config.json"
            )

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_dim**-0.5

    @property
    def rope_dim(self) -> int:
        return self.rotary_dim or self.head_dim


@dataclass
class MoEConfig:
    """A mixture of experts in place of the dense MLP: a router linear [E, hidden] scores the
    experts, softmax over all E, the top_k highest kept (renormalised to sum 1 with normalize_topk:
    Mixtral, Qwen3-MoE's norm_topk_prob; softmax -> top-k -> renormalise is top-k -> softmax of the
    logits); each token's output is the weighted sum of its top_k experts' gated MLPs (the
    MLPConfig's activation and intermediate_size, per expert). An optional shared expert (Qwen2-MoE),
    a gated MLP of shared_intermediate_size, is added for every token, scaled by
    sigmoid(shared_gate(x)) [T, 1] when shared_gate."""

    num_experts: int
    top_k: int
    normalize_topk: bool = True
    scoring: str = "softmax"
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_gate: bool = False

    def __post_init__(self) -> None:
        if self.scoring not in ROUTER_SCORINGS:
            raise TrtcError(f"router scoring {self.scoring!r} is not supported; supported: {', '.join(ROUTER_SCORINGS)}")
        if not 1 <= self.top_k <= self.num_experts:
            raise TrtcError(
                f"num_experts_per_tok {self.top_k} must be between 1 and the number of experts {self.num_experts}; "
                "fix config.json"
            )


@dataclass
class MLPConfig:
    intermediate_size: int  # per expert when moe is set
    activation: str = "silu"
    gated: bool = True  # down(act(gate(x)) * up(x))
    bias: bool = False
    moe: MoEConfig | None = None  # a mixture of these gated MLPs instead of one

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise TrtcError(
                f"activation {self.activation!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
            )
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if self.moe is not None and (not self.gated or self.bias):
            raise TrtcError("a mixture of experts needs gated MLPs without bias")


@dataclass
class DecoderLayerConfig:
    """h += attention_output_norm(attention(input_norm(h))); h += mlp_output_norm(mlp(post_attention_norm(h))).

    A norm that is None is the identity: input_norm / post_attention_norm are the pre-norms (None in a
    post-norm model such as EXAONE 4), attention_output_norm / mlp_output_norm the norms of a block's
    output before its residual add (Gemma 2/3 post-attention and post-feedforward norms)."""

    input_norm: NormConfig | None
    attention: AttentionConfig
    post_attention_norm: NormConfig | None
    mlp: MLPConfig
    attention_output_norm: NormConfig | None = None
    mlp_output_norm: NormConfig | None = None


@dataclass
class ModelGraph:
    """A decoder-only transformer: embedding -> layers -> final norm -> LM head."""

    architecture: str
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    layers: list[DecoderLayerConfig]
    final_norm: NormConfig
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    embedding_scale: float | None = None  # embeddings multiplied by it (in the model dtype), Gemma's sqrt(hidden)
    final_logit_soft_cap: float | None = None  # logits -> cap * tanh(logits / cap)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def long_rope_context(self) -> int | None:
        """The original context of the model's LongRoPE layers (None: no LongRoPE)."""
        contexts = {layer.attention.rope.long_context for layer in self.layers if layer.attention.use_rope} - {None}
        if len(contexts) > 1:
            raise TrtcError(f"LongRoPE layers with different original contexts ({sorted(contexts)}) are not supported")
        return next(iter(contexts), None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelGraph:
        d = dict(d)
        d["layers"] = [
            DecoderLayerConfig(
                input_norm=_norm(layer["input_norm"]),
                attention=AttentionConfig(
                    **{**layer["attention"], "rope": RopeConfig(**layer["attention"]["rope"])}
                ),
                post_attention_norm=_norm(layer["post_attention_norm"]),
                mlp=MLPConfig(**layer["mlp"]),
                attention_output_norm=_norm(layer.get("attention_output_norm")),
                mlp_output_norm=_norm(layer.get("mlp_output_norm")),
            )
            for layer in d["layers"]
        ]
        d["final_norm"] = NormConfig(**d["final_norm"])
        return cls(**d)

    def weight_shapes(self, quant: QuantConfig | None = None) -> dict[str, tuple[int, ...]]:
        """Every tensor of an unsharded checkpoint with its shape, in a fixed order. With `quant`,
        quantized linear layers hold the tensors of trtc/formats/quant_layout.py instead of a
        model-dtype weight (optional ones, `quant.is_optional`, included), and FP8 KV-cache
        scales are added."""
        h, v = self.hidden_size, self.vocab_size
        shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (v, h)}

        def linear(i: int, module: str, out: int, inp: int, bias: bool) -> None:
            name = f"layers.{i}.{module}"
            if quant is not None and quant.quantizes(i, module):
                shapes.update(quant.linear_tensors(name, out, inp))
            else:
                shapes[name + ".weight"] = (out, inp)
            if bias:
                shapes[name + ".bias"] = (out,)

        for i, layer in enumerate(self.layers):
            a, m, p = layer.attention, layer.mlp, f"layers.{i}."
            q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
            shapes.update(_norm_shapes(p + "input_norm", layer.input_norm, h))
            linear(i, "attention.q", q, h, a.qkv_bias)
            linear(i, "attention.k", kv, h, a.qkv_bias)
            linear(i, "attention.v", kv, h, a.qkv_bias)
            if a.qk_norm:
                shapes[p + "attention.q_norm.weight"] = (a.head_dim,)
                shapes[p + "attention.k_norm.weight"] = (a.head_dim,)
            linear(i, "attention.o", h, q, a.o_bias)
            shapes.update(_norm_shapes(p + "attention_output_norm", layer.attention_output_norm, h))
            if quant is not None and quant.kv_cache_fp8:
                shapes[p + "attention.k_cache_scale"] = ()
                shapes[p + "attention.v_cache_scale"] = ()
            shapes.update(_norm_shapes(p + "post_attention_norm", layer.post_attention_norm, h))
            if m.moe is not None:
                shapes.update(moe_shapes(p + "mlp.", m, h, quant))
                continue
            for name in ("gate", "up") if m.gated else ("up",):
                linear(i, f"mlp.{name}", m.intermediate_size, h, m.bias)
            linear(i, "mlp.down", h, m.intermediate_size, m.bias)
            shapes.update(_norm_shapes(p + "mlp_output_norm", layer.mlp_output_norm, h))
        shapes.update(_norm_shapes("final_norm", self.final_norm, h))
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (v, h)
        return shapes


def _norm(d: dict[str, Any] | None) -> NormConfig | None:
    return None if d is None else NormConfig(**d)


def _norm_shapes(prefix: str, norm: NormConfig | None, hidden: int) -> dict[str, tuple[int, ...]]:
    if norm is None:
        return {}
    shapes = {prefix + ".weight": (hidden,)}
    if norm.bias:
        shapes[prefix + ".bias"] = (hidden,)
    return shapes


def moe_shapes(prefix: str, mlp: MLPConfig, hidden: int, quant: QuantConfig | None = None) -> dict[str, tuple[int, ...]]:
    """The tensors of an MoE MLP `prefix` (`layers.{i}.mlp.`): router [E, hidden], the experts'
    weights stacked over E (gate, up [E, I, hidden], down [E, hidden, I]; quantized: every tensor of
    quant_layout.py's linear with E in front), and the shared expert's plain gate/up/down."""
    moe, inter = mlp.moe, mlp.intermediate_size
    e = moe.num_experts
    shapes: dict[str, tuple[int, ...]] = {prefix + "router.weight": (e, hidden)}
    layer = int(prefix.split(".")[1])
    for name, out, inp in (("gate", inter, hidden), ("up", inter, hidden), ("down", hidden, inter)):
        module = f"{prefix}experts.{name}"
        if quant is not None and quant.quantizes(layer, f"mlp.experts.{name}"):
            shapes.update({k: (e, *v) for k, v in quant.linear_tensors(module, out, inp).items()})
        else:
            shapes[module + ".weight"] = (e, out, inp)
    if moe.shared_intermediate_size:
        s = moe.shared_intermediate_size
        for name, out, inp in (("gate", s, hidden), ("up", s, hidden), ("down", hidden, s)):
            module = f"{prefix}shared.{name}"
            if quant is not None and quant.quantizes(layer, f"mlp.shared.{name}"):
                shapes.update(quant.linear_tensors(module, out, inp))
            else:
                shapes[module + ".weight"] = (out, inp)
        if moe.shared_gate:
            shapes[prefix + "shared_gate.weight"] = (1, hidden)
    return shapes


def layer_linears(layer: DecoderLayerConfig) -> tuple[str, ...]:
    """The linear modules of a decoder layer that quantization may replace (an MoE router and shared
    expert gate stay in the model dtype), a subset of quant_layout.LINEARS."""
    attention = ("attention.q", "attention.k", "attention.v", "attention.o")
    m = layer.mlp
    if m.moe is None:
        return (*attention, *(("mlp.gate", "mlp.up") if m.gated else ("mlp.up",)), "mlp.down")
    shared = ("mlp.shared.gate", "mlp.shared.up", "mlp.shared.down") if m.moe.shared_intermediate_size else ()
    return (*attention, "mlp.experts.gate", "mlp.experts.up", "mlp.experts.down", *shared)
