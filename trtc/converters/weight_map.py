"""Weight mapping as data: a table from trtc names to HF names (STYLE.md).

An entry maps a trtc module to an HF module (`layers.{i}.attention.q` -> `model.layers.{i}.self_attn.q_proj`)
and the parameter suffix follows (`.weight`, `.bias`, and a quantized checkpoint's `.weight_scale`,
`.input_scale`, `.pre_quant_scale`, ...), so quantization needs no entries. An entry may also map
one tensor (`layers.{i}.attention.k_cache_scale` -> `...k_proj.k_scale`); a tensor entry wins
over its module's. `{i}` stands for the layer index. A tensor of the HF checkpoint that is neither
mapped nor declared unused is an error; so is a mapped tensor that is missing or has the wrong shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LAYER = re.compile(r"\.(\d+)\.")


def _pattern(name: str) -> str:
    return _LAYER.sub(".{i}.", name, count=1)


def _fill(pattern: str, like: str) -> str:
    m = _LAYER.search(like)
    return pattern.replace("{i}", m.group(1)) if m else pattern


@dataclass(frozen=True)
class WeightMap:
    names: dict[str, str]  # trtc module or tensor pattern -> HF module or tensor pattern
    unused: tuple[str, ...] = ()  # HF tensor patterns dropped on purpose
    # an HF module holding several trtc modules stacked along its output rows, in order
    # (`...qkv_proj` -> q, k, v); the trtc modules map to the fused HF module in `names`
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def fused_parts(self, trtc_module: str) -> tuple[str, ...] | None:
        """The trtc modules stacked with `trtc_module` in one HF tensor (itself included), or None."""
        pattern = _pattern(trtc_module)
        for parts in self.fused.values():
            if pattern in parts:
                return tuple(_fill(p, trtc_module) for p in parts)
        return None

    def source_module(self, trtc_module: str) -> str:
        """The HF module of a trtc module (`layers.3.mlp.down` -> `model.layers.3.mlp.down_proj`)."""
        return _fill(self.names[_pattern(trtc_module)], trtc_module)

    def source(self, trtc_name: str) -> str:
        """The HF tensor name of a trtc tensor name."""
        pattern = _pattern(trtc_name)
        if pattern in self.names:
            return _fill(self.names[pattern], trtc_name)
        module, suffix = trtc_name.rsplit(".", 1)
        return f"{self.source_module(module)}.{suffix}"

    def target(self, hf_name: str) -> str | None:
        """The trtc name an HF tensor maps to (None if no entry covers it)."""
        pattern = _pattern(hf_name)
        for trtc, hf in self.names.items():
            if hf == pattern:
                return _fill(trtc, hf_name)
        module, _, suffix = pattern.rpartition(".")
        for trtc, hf in self.names.items():
            if hf == module:
                return _fill(f"{trtc}.{suffix}", hf_name)
        return None

    def is_unused(self, hf_name: str) -> bool:
        return _pattern(hf_name) in self.unused


# The names shared by Llama, Mistral, Qwen2 and Qwen3 checkpoints.
LLAMA_WEIGHTS = WeightMap(
    names={
        "embedding": "model.embed_tokens",
        "layers.{i}.input_norm": "model.layers.{i}.input_layernorm",
        "layers.{i}.attention.q": "model.layers.{i}.self_attn.q_proj",
        "layers.{i}.attention.k": "model.layers.{i}.self_attn.k_proj",
        "layers.{i}.attention.v": "model.layers.{i}.self_attn.v_proj",
        "layers.{i}.attention.q_norm": "model.layers.{i}.self_attn.q_norm",
        "layers.{i}.attention.k_norm": "model.layers.{i}.self_attn.k_norm",
        "layers.{i}.attention.o": "model.layers.{i}.self_attn.o_proj",
        # ModelOpt exports the FP8 KV-cache scales on k_proj / v_proj
        "layers.{i}.attention.k_cache_scale": "model.layers.{i}.self_attn.k_proj.k_scale",
        "layers.{i}.attention.v_cache_scale": "model.layers.{i}.self_attn.v_proj.v_scale",
        "layers.{i}.post_attention_norm": "model.layers.{i}.post_attention_layernorm",
        "layers.{i}.mlp.gate": "model.layers.{i}.mlp.gate_proj",
        "layers.{i}.mlp.up": "model.layers.{i}.mlp.up_proj",
        "layers.{i}.mlp.down": "model.layers.{i}.mlp.down_proj",
        "final_norm": "model.norm",
        "lm_head": "lm_head",
    },
    unused=("model.layers.{i}.self_attn.rotary_emb.inv_freq",),
)


# Gemma 2 / 3: four norms per layer; HF's post_attention_layernorm is the norm of the attention
# output, pre_feedforward_layernorm the MLP's pre-norm.
GEMMA_WEIGHTS = WeightMap(
    names={
        **LLAMA_WEIGHTS.names,
        "layers.{i}.attention_output_norm": "model.layers.{i}.post_attention_layernorm",
        "layers.{i}.post_attention_norm": "model.layers.{i}.pre_feedforward_layernorm",
        "layers.{i}.mlp_output_norm": "model.layers.{i}.post_feedforward_layernorm",
    },
    unused=LLAMA_WEIGHTS.unused,
)


# Phi-3 / Phi-4: q, k, v fused in qkv_proj and gate, up in gate_up_proj (split at convert)
PHI3_WEIGHTS = WeightMap(
    names={
        **LLAMA_WEIGHTS.names,
        "layers.{i}.attention.q": "model.layers.{i}.self_attn.qkv_proj",
        "layers.{i}.attention.k": "model.layers.{i}.self_attn.qkv_proj",
        "layers.{i}.attention.v": "model.layers.{i}.self_attn.qkv_proj",
        "layers.{i}.mlp.gate": "model.layers.{i}.mlp.gate_up_proj",
        "layers.{i}.mlp.up": "model.layers.{i}.mlp.gate_up_proj",
    },
    unused=LLAMA_WEIGHTS.unused,
    fused={
        "model.layers.{i}.self_attn.qkv_proj": ("layers.{i}.attention.q", "layers.{i}.attention.k", "layers.{i}.attention.v"),
        "model.layers.{i}.mlp.gate_up_proj": ("layers.{i}.mlp.gate", "layers.{i}.mlp.up"),
    },
)


# EXAONE 4: post-norm, HF's post_attention_layernorm and post_feedforward_layernorm normalise the
# attention and MLP outputs; there are no pre-norms
EXAONE4_WEIGHTS = WeightMap(
    names={
        **{k: v for k, v in LLAMA_WEIGHTS.names.items() if k not in ("layers.{i}.input_norm", "layers.{i}.post_attention_norm")},
        "layers.{i}.attention_output_norm": "model.layers.{i}.post_attention_layernorm",
        "layers.{i}.mlp_output_norm": "model.layers.{i}.post_feedforward_layernorm",
    },
    unused=LLAMA_WEIGHTS.unused,
)
