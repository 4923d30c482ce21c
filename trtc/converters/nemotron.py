"""NemotronForCausalLM (Nemotron-3/4, Minitron): LayerNorm with (1 + w) and a bias ("layernorm1p"),
a non-gated squared-ReLU MLP (up, down), partial rotary embedding."""

from trtc.converters.architecture import Architecture
from trtc.converters.hf_config import decoder_graph
from trtc.converters.weight_map import LLAMA_WEIGHTS
from trtc.formats.graph import NormConfig


def graph_from_config(config):
    bias = bool(config.get("attention_bias", False))
    graph = decoder_graph(config, qkv_bias=bias, o_bias=bias)
    norm = NormConfig(kind="layer", eps=float(config.get("norm_eps", 1e-5)), offset=1.0, bias=True)
    for layer in graph.layers:
        layer.input_norm = layer.post_attention_norm = norm
        layer.mlp.gated = False
    graph.final_norm = norm
    return graph


ARCHITECTURE = Architecture("NemotronForCausalLM", graph_from_config, LLAMA_WEIGHTS)
