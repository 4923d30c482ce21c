"""Qwen2ForCausalLM: bias on q/k/v (not o), optional sliding window on the upper layers."""

from trtc.converters.architecture import Architecture
from trtc.converters.hf_config import decoder_graph, layer_type_windows
from trtc.converters.weight_map import LLAMA_WEIGHTS


def graph_from_config(config):
    return decoder_graph(config, qkv_bias=True, o_bias=False, sliding_windows=layer_type_windows(config))


ARCHITECTURE = Architecture("Qwen2ForCausalLM", graph_from_config, LLAMA_WEIGHTS)
