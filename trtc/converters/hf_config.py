"""Reading HF config.json fields into the layer graph, with both RoPE config styles."""

from __future__ import annotations

import math
from typing import Any

from trtc.errors import TrtcError
from trtc.formats.graph import (
    AttentionConfig,
    DecoderLayerConfig,
    MLPConfig,
    ModelGraph,
    NormConfig,
    RopeConfig,
)

_ACTIVATIONS = {
    "silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "relu2": "relu2",
}


def positive_int(config: dict[str, Any], key: str, default: int | None = None) -> int:
    """config[key] as a positive integer; `default` when absent (an error if there is none)."""
    value = config.get(key)
    if value is None:
        if default is None:
            raise TrtcError(f"config.json has no {key!r}; add it (the model's {key})")
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise TrtcError(f"config.json {key!r} must be a positive integer, got {value!r}; fix config.json")
    return value


def rope_config(config: dict[str, Any], layer_type: str | None = None) -> RopeConfig:
    """RoPE from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (transformers 4).
    Per-layer-type parameters (Gemma 3: {"full_attention": {...}, "sliding_attention": {...}}) are
    read for `layer_type`."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    if isinstance(params, dict) and params:
        theta, scaling = params.get("rope_theta", config.get("rope_theta", 10000.0)), params
    else:
        theta, scaling = config.get("rope_theta", 10000.0), config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return RopeConfig(theta=float(theta))
    original = scaling.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    if kind == "longrope":  # HF modeling_rope_utils._compute_longrope_parameters
        factor = scaling.get("factor")
        if factor is None and original:
            factor = positive_int(config, "max_position_embeddings", 2048) / original
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if not factor or factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return RopeConfig(
            type=kind, theta=float(theta), original_max_position_embeddings=original,
            short_factor=[float(f) for f in scaling.get("short_factor") or []] or None,
            long_factor=[float(f) for f in scaling.get("long_factor") or []] or None,
            attention_factor=float(attention_factor),
        )
    return RopeConfig(
        type=kind,
        theta=float(theta),
        factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
    )


def rotary_dim(config: dict[str, Any], head_dim: int) -> int | None:
    """The rotary dimension of a partial rotary embedding (`partial_rotary_factor` < 1), else None."""
    params = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    dim = int(head_dim * float(factor))
    if dim % 2 or dim <= 0:
        raise TrtcError(f"partial_rotary_factor {factor} gives an odd or empty rotary dimension {dim}; fix config.json")
    return None if dim == head_dim else dim


def activation(config: dict[str, Any]) -> str:
    act = config.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise TrtcError(f"hidden_act {act!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[act]


def eos_ids(config: dict[str, Any]) -> list[int]:
    eos = config.get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def decoder_graph(
    config: dict[str, Any],
    *,
    qkv_bias: bool,
    o_bias: bool,
    qk_norm: bool = False,
    sliding_windows: list[int | None] | None = None,
) -> ModelGraph:
    """The graph of a Llama-family decoder (pre-norm, RoPE attention, gated MLP, RMSNorm)."""
    hidden = positive_int(config, "hidden_size")
    heads = positive_int(config, "num_attention_heads")
    kv_heads = positive_int(config, "num_key_value_heads", heads)
    layers = positive_int(config, "num_hidden_layers")
    if config.get("head_dim") is None and hidden % heads:
        raise TrtcError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}; fix config.json")
    head_dim = positive_int(config, "head_dim", hidden // heads)
    eps = float(config.get("rms_norm_eps", 1e-6))
    windows = sliding_windows or [None] * layers
    types = config.get("layer_types") or [None] * layers
    if len(types) != layers:
        raise TrtcError(f"config.json layer_types has {len(types)} entries for {layers} layers; fix config.json")
    ropes = {t: rope_config(config, t) for t in set(types)}
    partial = rotary_dim(config, head_dim)
    norm = NormConfig(kind="rms", eps=eps)
    mlp = MLPConfig(
        intermediate_size=positive_int(config, "intermediate_size"),
        activation=activation(config),
        bias=bool(config.get("mlp_bias", False)),
    )
    return ModelGraph(
        architecture=config["architectures"][0],
        vocab_size=positive_int(config, "vocab_size"),
        hidden_size=hidden,
        max_position_embeddings=positive_int(config, "max_position_embeddings", 2048),
        layers=[
            DecoderLayerConfig(
                input_norm=norm,
                attention=AttentionConfig(
                    num_heads=heads,
                    num_kv_heads=kv_heads,
                    head_dim=head_dim,
                    rope=ropes[types[i]],
                    rotary_dim=partial,
                    qkv_bias=qkv_bias,
                    o_bias=o_bias,
                    qk_norm=qk_norm,
                    qk_norm_eps=eps,
                    sliding_window=windows[i],
                ),
                post_attention_norm=norm,
                mlp=mlp,
            )
            for i in range(layers)
        ],
        final_norm=norm,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=eos_ids(config),
        pad_token_id=config.get("pad_token_id"),
    )


def layer_type_windows(config: dict[str, Any]) -> list[int | None]:
    """Per-layer sliding windows of Qwen-style configs (`layer_types`, or `use_sliding_window` +
    `max_window_layers`)."""
    n = positive_int(config, "num_hidden_layers")
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if types is None:
        use = bool(config.get("use_sliding_window", False))
        first = config.get("max_window_layers", n)
        types = ["sliding_attention" if use and i >= first else "full_attention" for i in range(n)]
    if len(types) != n:
        raise TrtcError(f"config.json layer_types has {len(types)} entries for {n} layers; fix config.json")
    return [window if t == "sliding_attention" and window else None for t in types]
