"""Reading HF config.json fields into the layer graph, with both RoPE config styles."""

from __future__ import annotations

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

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


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


def rope_config(config: dict[str, Any]) -> RopeConfig:
    """RoPE from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (transformers 4)."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta, scaling = params.get("rope_theta", config.get("rope_theta", 10000.0)), params
    else:
        theta, scaling = config.get("rope_theta", 10000.0), config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return RopeConfig(theta=float(theta))
    return RopeConfig(
        type=kind,
        theta=float(theta),
        factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=scaling.get("original_max_position_embeddings"),
    )


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
    rope = rope_config(config)
    windows = sliding_windows or [None] * layers
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
                    rope=rope,
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
