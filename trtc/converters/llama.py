"""LlamaForCausalLM: Llama 2, 3, 3.1 (RoPE scaling llama3, linear, dynamic)."""

from trtc.converters.architecture import Architecture
from trtc.converters.hf_config import decoder_graph
from trtc.converters.weight_map import LLAMA_WEIGHTS


def graph_from_config(config):
    bias = bool(config.get("attention_bias", False))
    return decoder_graph(config, qkv_bias=bias, o_bias=bias)


ARCHITECTURE = Architecture("LlamaForCausalLM", graph_from_config, LLAMA_WEIGHTS)
