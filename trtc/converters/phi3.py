"""Phi3ForCausalLM (Phi-3, Phi-3.5, Phi-4, Phi-4-mini): q, k, v and gate, up fused in the checkpoint
(split at convert), LongRoPE (short/long factors by sequence length), partial rotary where set,
a sliding window on every layer where `sliding_window` is set."""

from trtc.converters.architecture import Architecture
from trtc.converters.hf_config import decoder_graph, positive_int
from trtc.converters.weight_map import PHI3_WEIGHTS


def graph_from_config(config):
    window = config.get("sliding_window")
    layers = positive_int(config, "num_hidden_layers")
    bias = bool(config.get("attention_bias", False))
    return decoder_graph(config, qkv_bias=bias, o_bias=bias, sliding_windows=[window] * layers)


ARCHITECTURE = Architecture("Phi3ForCausalLM", graph_from_config, PHI3_WEIGHTS)
