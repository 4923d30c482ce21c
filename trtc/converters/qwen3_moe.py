"""Qwen3MoeForCausalLM: Qwen3 attention (q/k norm); the MLP of the layers that decoder_sparse_step
picks (and mlp_only_layers does not) a mixture of moe_intermediate_size experts, top-k renormalised
with norm_topk_prob; the others dense MLPs of intermediate_size."""

from trtc.converters.architecture import Architecture
from trtc.converters.hf_config import decoder_graph, layer_type_windows, positive_int
from trtc.converters.moe import QWEN_MOE_WEIGHTS, num_experts, qwen_sparse_layers, with_experts
from trtc.formats.graph import MoEConfig


def graph_from_config(config):
    bias = bool(config.get("attention_bias", False))
    graph = decoder_graph(config, qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_windows=layer_type_windows(config))
    moe = MoEConfig(num_experts=num_experts(config), top_k=positive_int(config, "num_experts_per_tok"),
                    normalize_topk=bool(config.get("norm_topk_prob", False)))
    return with_experts(graph, config, moe, "moe_intermediate_size", qwen_sparse_layers(config))


ARCHITECTURE = Architecture("Qwen3MoeForCausalLM", graph_from_config, QWEN_MOE_WEIGHTS)
