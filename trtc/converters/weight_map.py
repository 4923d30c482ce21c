"""Weight mapping as data: a table from trtc tensor names to HF tensor names (STYLE.md).

`{i}` in a pattern stands for the layer index. A tensor of the HF checkpoint that is neither mapped
nor declared unused is an error; so is a mapped tensor that is missing or has the wrong shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LAYER = re.compile(r"\.(\d+)\.")


def _pattern(name: str) -> str:
    return _LAYER.sub(".{i}.", name, count=1)


@dataclass(frozen=True)
class WeightMap:
    names: dict[str, str]  # trtc pattern -> HF pattern
    unused: tuple[str, ...] = ()  # HF patterns dropped on purpose

    def source(self, trtc_name: str) -> str:
        """The HF name of a trtc tensor name."""
        m = _LAYER.search(trtc_name)
        pattern = self.names[_pattern(trtc_name)]
        return pattern.replace("{i}", m.group(1)) if m else pattern

    def is_unused(self, hf_name: str) -> bool:
        return _pattern(hf_name) in self.unused


# The names shared by Llama, Mistral, Qwen2 and Qwen3 checkpoints.
LLAMA_WEIGHTS = WeightMap(
    names={
        "embedding.weight": "model.embed_tokens.weight",
        "layers.{i}.input_norm.weight": "model.layers.{i}.input_layernorm.weight",
        "layers.{i}.attention.q.weight": "model.layers.{i}.self_attn.q_proj.weight",
        "layers.{i}.attention.k.weight": "model.layers.{i}.self_attn.k_proj.weight",
        "layers.{i}.attention.v.weight": "model.layers.{i}.self_attn.v_proj.weight",
        "layers.{i}.attention.q.bias": "model.layers.{i}.self_attn.q_proj.bias",
        "layers.{i}.attention.k.bias": "model.layers.{i}.self_attn.k_proj.bias",
        "layers.{i}.attention.v.bias": "model.layers.{i}.self_attn.v_proj.bias",
        "layers.{i}.attention.q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
        "layers.{i}.attention.k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
        "layers.{i}.attention.o.weight": "model.layers.{i}.self_attn.o_proj.weight",
        "layers.{i}.attention.o.bias": "model.layers.{i}.self_attn.o_proj.bias",
        "layers.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "layers.{i}.mlp.gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
        "layers.{i}.mlp.up.weight": "model.layers.{i}.mlp.up_proj.weight",
        "layers.{i}.mlp.down.weight": "model.layers.{i}.mlp.down_proj.weight",
        "layers.{i}.mlp.gate.bias": "model.layers.{i}.mlp.gate_proj.bias",
        "layers.{i}.mlp.up.bias": "model.layers.{i}.mlp.up_proj.bias",
        "layers.{i}.mlp.down.bias": "model.layers.{i}.mlp.down_proj.bias",
        "final_norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    },
    unused=("model.layers.{i}.self_attn.rotary_emb.inv_freq",),
)
