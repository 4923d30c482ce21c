"""Qwen2MoeForCausalLM: Qwen2 attention (qkv bias); mixtures of experts as Qwen3-MoE's, plus a
shared expert of shared_expert_intermediate_size scaled by sigmoid(shared_expert_gate(x))."""

from trtc.converters.architecture import Architecture
from trtc.converters.hf_config import decoder_graph, layer_type_windows, positive_int
from trtc.converters.moe import QWEN_MOE_WEIGHTS, num_experts, qwen_sparse_layers, with_experts
from trtc.formats.graph import MoEConfig


def graph_from_config(config):
    graph = decoder_graph(config, qkv_bias=True, o_bias=False, sliding_windows=layer_type_windows(config))
    shared = config.get("shared_expert_intermediate_size") or 0
    moe = MoEConfig(num_experts=num_experts(config), top_k=positive_int(config, "num_experts_per_tok"),
                    normalize_topk=bool(config.get("norm_topk_prob", False)),
                    shared_intermediate_size=shared, shared_gate=bool(shared))
    return with_experts(graph, config, moe, "moe_intermediate_size", qwen_sparse_layers(config))


ARCHITECTURE = Architecture("Qwen2MoeForCausalLM", graph_from_config, QWEN_MOE_WEIGHTS)
