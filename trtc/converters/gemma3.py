"""Gemma3ForCausalLM (text): Gemma 2's layers plus (1 + w) q/k norms, per-layer `layer_types`
(5 local : 1 global by default) with a RoPE θ and scaling of their own for local and global layers."""

from trtc.converters.architecture import Architecture
from trtc.converters.gemma2 import gemma_graph
from trtc.converters.weight_map import GEMMA_WEIGHTS


def graph_from_config(config):
    return gemma_graph(config, qk_norm=True)


ARCHITECTURE = Architecture("Gemma3ForCausalLM", graph_from_config, GEMMA_WEIGHTS)
