"""Gemma2ForCausalLM: (1 + w) RMSNorms before and after attention and MLP, embeddings scaled by
sqrt(hidden), GeGLU (gelu_pytorch_tanh), attention and final logit soft-capping, softmax scale
query_pre_attn_scalar ** -0.5, alternating sliding-window and global layers (`layer_types`)."""

import dataclasses

from trtc.converters.architecture import Architecture
from trtc.converters.hf_config import decoder_graph, layer_type_windows
from trtc.converters.weight_map import GEMMA_WEIGHTS
from trtc.formats.graph import ModelGraph


def gemma_graph(config, *, qk_norm: bool) -> ModelGraph:
    """The Gemma 2 / Gemma 3 text decoder."""
    config = {**config, "hidden_act": config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"}
    bias = bool(config.get("attention_bias", False))
    graph = decoder_graph(config, qkv_bias=bias, o_bias=bias, qk_norm=qk_norm, sliding_windows=layer_type_windows(config))
    norm = dataclasses.replace(graph.final_norm, offset=1.0)  # Gemma RMSNorm: x * (1 + w)
    scalar, cap = config.get("query_pre_attn_scalar"), config.get("attn_logit_softcapping")
    for layer in graph.layers:
        layer.input_norm = layer.post_attention_norm = layer.attention_output_norm = layer.mlp_output_norm = norm
        a = layer.attention
        a.scale = float(scalar) ** -0.5 if scalar else None
        a.soft_cap = float(cap) if cap else None
        a.qk_norm_offset = 1.0
    graph.final_norm = norm
    graph.embedding_scale = graph.hidden_size**0.5
    final_cap = config.get("final_logit_softcapping")
    graph.final_logit_soft_cap = float(final_cap) if final_cap else None
    return graph


def graph_from_config(config):
    return gemma_graph(config, qk_norm=False)


ARCHITECTURE = Architecture("Gemma2ForCausalLM", graph_from_config, GEMMA_WEIGHTS)
