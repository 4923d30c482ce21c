"""Mixture-of-experts fields of HF configs (Mixtral, Qwen2-MoE, Qwen3-MoE) and their weight names.

HF checkpoints store each expert as its own linears (`experts.{e}.w1` / `gate_proj`, ...); a trtc
checkpoint stacks them per layer (`layers.{i}.mlp.experts.gate.weight` [E, I, hidden]). The weight
map's entry for an expert stack names the HF module with `{e}` for the expert index.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trtc.converters.hf_config import activation, positive_int
from trtc.converters.tensor_source import EXPERT
from trtc.converters.weight_map import LLAMA_WEIGHTS, WeightMap
from trtc.errors import TrtcError
from trtc.formats.graph import MLPConfig, ModelGraph, MoEConfig


def num_experts(config: dict[str, Any]) -> int:
    for key in ("num_local_experts", "num_experts"):
        if config.get(key) is not None:
            return positive_int(config, key)
    raise TrtcError("config.json has neither 'num_local_experts' nor 'num_experts'; add the number of experts")


def with_experts(graph: ModelGraph, config: dict[str, Any], moe: MoEConfig, intermediate_key: str,
                 sparse_layers: list[int] | None = None) -> ModelGraph:
    """`graph` with the MLP of each layer of `sparse_layers` (default: all) a mixture of experts of
    config[intermediate_key] per expert."""
    mlp = MLPConfig(intermediate_size=positive_int(config, intermediate_key), activation=activation(config), moe=moe)
    sparse = set(range(graph.num_layers) if sparse_layers is None else sparse_layers)
    graph.layers = [dataclasses.replace(layer, mlp=mlp) if i in sparse else layer for i, layer in enumerate(graph.layers)]
    return graph


def qwen_sparse_layers(config: dict[str, Any]) -> list[int]:
    """Qwen2/3-MoE: layer i is sparse unless in `mlp_only_layers`, when (i + 1) % decoder_sparse_step == 0."""
    n = positive_int(config, "num_hidden_layers")
    step = positive_int(config, "decoder_sparse_step", 1)
    dense = set(config.get("mlp_only_layers") or [])
    return [i for i in range(n) if i not in dense and (i + 1) % step == 0]


def expert_weights(base: WeightMap, prefix: str, gate: str, up: str, down: str, router: str,
                   extra: dict[str, str] | None = None) -> WeightMap:
    """`base`'s names plus an MoE MLP's: prefix `model.layers.{i}.mlp`, the experts' linear names."""
    names = {
        **base.names,
        "layers.{i}.mlp.router": f"{prefix}.{router}",
        "layers.{i}.mlp.experts.gate": f"{prefix}.experts.{EXPERT}.{gate}",
        "layers.{i}.mlp.experts.up": f"{prefix}.experts.{EXPERT}.{up}",
        "layers.{i}.mlp.experts.down": f"{prefix}.experts.{EXPERT}.{down}",
        **(extra or {}),
    }
    return WeightMap(names=names, unused=base.unused)


MIXTRAL_WEIGHTS = expert_weights(LLAMA_WEIGHTS, "model.layers.{i}.block_sparse_moe", "w1", "w3", "w2", "gate")
QWEN_MOE_WEIGHTS = expert_weights(LLAMA_WEIGHTS, "model.layers.{i}.mlp", "gate_proj", "up_proj", "down_proj", "gate", {
    "layers.{i}.mlp.shared.gate": "model.layers.{i}.mlp.shared_expert.gate_proj",
    "layers.{i}.mlp.shared.up": "model.layers.{i}.mlp.shared_expert.up_proj",
    "layers.{i}.mlp.shared.down": "model.layers.{i}.mlp.shared_expert.down_proj",
    "layers.{i}.mlp.shared_gate": "model.layers.{i}.mlp.shared_expert_gate",
})
