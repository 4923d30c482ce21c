"""Tiny random HF models built from inline configs (no downloads), one per case the tests cover."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Exaone4Config,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    NemotronConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=131,  # odd, so vocab-parallel shards are padded
    max_position_embeddings=256,
    initializer_range=0.1,  # larger than the default: sharper attention, a stricter comparison
    bos_token_id=1,
    eos_token_id=2,
)

CASES = {
    # GQA, untied, Llama 3.1 RoPE scaling (transformers-5 `rope_parameters` style)
    "llama3_gqa": (LlamaConfig, dict(
        num_key_value_heads=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    )),
    # MHA, tied, attention and MLP bias, linear RoPE scaling
    "llama2_tied_bias": (LlamaConfig, dict(
        num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    )),
    # sliding window shorter than the sequence
    "mistral_window": (MistralConfig, dict(num_key_value_heads=2, sliding_window=7)),
    # qkv bias, tied embeddings, sliding window on the upper layer only
    "qwen2_tied": (Qwen2Config, dict(
        num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True, sliding_window=9,
        max_window_layers=1,
    )),
    # q/k RMSNorm, head_dim != hidden / heads, one KV head (replicated under tp 2 and 4)
    "qwen3_qknorm": (Qwen3Config, dict(num_key_value_heads=1, head_dim=32, tie_word_embeddings=False)),
    # four (1 + w) norms, scaled embeddings, GeGLU, soft-caps small enough to bind, query_pre_attn_scalar,
    # sliding (window 7) and global layers alternating
    "gemma2": (Gemma2Config, dict(
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=7,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
    )),
    # fused qkv / gate_up, partial rotary (half the head), LongRoPE past its original context from the
    # first token on (HF's generate recomputes the cache where a sequence crosses it; see
    # test_reference_vs_hf for the crossing), a sliding window on every layer
    "phi3": (Phi3Config, dict(
        num_key_value_heads=2, sliding_window=13, original_max_position_embeddings=2, pad_token_id=0,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 3.0, 5.0, 9.0]},
    )),
    # Gemma 2's layers plus (1 + w) q/k norms; layers 0, 2 local (window 5, θ 100), 1 global (θ 10000,
    # linear scaling 2)
    "gemma3": (Gemma3TextConfig, dict(
        num_hidden_layers=3, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=3.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
    )),
    # layernorm1p, squared-ReLU non-gated MLP with bias, partial rotary (a quarter of the head)
    "nemotron": (NemotronConfig, dict(
        num_key_value_heads=2, mlp_bias=True, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    )),
    # post-norm, q/k norm, local layers 0, 1 (window 6, RoPE) and a global layer 2 without RoPE
    "exaone4": (Exaone4Config, dict(
        num_hidden_layers=3, num_key_value_heads=2, sliding_window=6, sliding_window_pattern=3, pad_token_id=0,
    )),
}


def make_hf_model(directory: Path, case: str, seed: int = 0, legacy_rope: bool = False, **overrides) -> Path:
    """Save a random model of `case` to `directory` (safetensors) and return the path.

    legacy_rope rewrites config.json in the transformers-4 style (`rope_theta` + `rope_scaling`),
    as most published checkpoints are.
    """
    config_cls, kwargs = CASES[case]
    config = config_cls(**{**COMMON, **kwargs, **overrides})
    config.architectures = [config_cls.__name__.replace("TextConfig", "Config").replace("Config", "ForCausalLM")]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    if legacy_rope:
        path = directory / "config.json"
        d = json.loads(path.read_text())
        params = d.pop("rope_parameters")
        d["rope_theta"] = params.pop("rope_theta")
        d["rope_scaling"] = (
            None if params.get("rope_type") == "default" else {"type": params.pop("rope_type"), **params}
        )
        path.write_text(json.dumps(d))
    return directory


def load_hf(directory: Path):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


WORDS = [f"w{i}" for i in range(COMMON["vocab_size"] - 3)]


def add_word_tokenizer(directory: Path) -> Path:
    """A word-level tokenizer over the model's vocabulary (<unk> 0, <s> 1, </s> 2, then w0, w1, ...),
    built with `tokenizers` and saved as HF files, so text prompts work on the random models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(directory)
    return directory


def text_of(ids) -> str:
    return " ".join(WORDS[i - 3] for i in ids)
