"""MistralForCausalLM: Llama layers with a sliding attention window on every layer."""

from trtc.converters.architecture import Architecture
from trtc.converters.hf_config import decoder_graph, positive_int
from trtc.converters.weight_map import LLAMA_WEIGHTS


def graph_from_config(config):
    window = config.get("sliding_window")
    layers = positive_int(config, "num_hidden_layers")
    return decoder_graph(config, qkv_bias=False, o_bias=False, sliding_windows=[window] * layers)


ARCHITECTURE = Architecture("MistralForCausalLM", graph_from_config, LLAMA_WEIGHTS)
