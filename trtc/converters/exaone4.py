"""Exaone4ForCausalLM (EXAONE 4.0): post-norm layers (RMSNorm of the attention and MLP outputs
before their residual adds, no pre-norms), q/k RMSNorm, hybrid sliding-window / global layers by
`layer_types`; with a sliding window configured, the global layers have no RoPE."""

from trtc.converters.architecture import Architecture
from trtc.converters.hf_config import decoder_graph, layer_type_windows
from trtc.converters.weight_map import EXAONE4_WEIGHTS


def graph_from_config(config):
    windows = layer_type_windows(config)
    graph = decoder_graph(config, qkv_bias=False, o_bias=False, qk_norm=True, sliding_windows=windows)
    norm = graph.final_norm
    for layer, window in zip(graph.layers, windows):
        layer.attention_output_norm = layer.mlp_output_norm = norm
        layer.input_norm = layer.post_attention_norm = None
        # HF: RoPE where the model has no sliding window at all, or on the sliding layers
        layer.attention.use_rope = config.get("sliding_window") is None or window is not None
    return graph


ARCHITECTURE = Architecture("Exaone4ForCausalLM", graph_from_config, EXAONE4_WEIGHTS)
