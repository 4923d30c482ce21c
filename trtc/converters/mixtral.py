"""MixtralForCausalLM: Mistral attention, every MLP a mixture of experts (softmax, top-k renormalised)."""

from trtc.converters.architecture import Architecture
from trtc.converters.hf_config import decoder_graph, positive_int
from trtc.converters.moe import MIXTRAL_WEIGHTS, num_experts, with_experts
from trtc.formats.graph import MoEConfig


def graph_from_config(config):
    layers = positive_int(config, "num_hidden_layers")
    graph = decoder_graph(config, qkv_bias=False, o_bias=False, sliding_windows=[config.get("sliding_window")] * layers)
    moe = MoEConfig(num_experts=num_experts(config), top_k=positive_int(config, "num_experts_per_tok"), normalize_topk=True)
    return with_experts(graph, config, moe, "intermediate_size")


ARCHITECTURE = Architecture("MixtralForCausalLM", graph_from_config, MIXTRAL_WEIGHTS)
