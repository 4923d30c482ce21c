"""Qwen3ForCausalLM: per-head RMSNorm of q and k before RoPE, explicit head_dim."""

from trtc.converters.architecture import Architecture
from trtc.converters.hf_config import decoder_graph, layer_type_windows
from trtc.converters.weight_map import LLAMA_WEIGHTS


def graph_from_config(config):
    bias = bool(config.get("attention_bias", False))
    return decoder_graph(
        config, qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_windows=layer_type_windows(config)
    )


ARCHITECTURE = Architecture("Qwen3ForCausalLM", graph_from_config, LLAMA_WEIGHTS)
