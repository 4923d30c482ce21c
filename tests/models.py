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
    MixtralConfig,
    NemotronConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
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

# Mixtures of experts: 4 experts of 32, top 2, a sharper router (initializer_range) so that every
# expert is chosen by some token of the tests' prompts
MOE_CASES = {
    # softmax -> top-2 renormalised, every layer sparse, sliding window
    "mixtral": (MixtralConfig, dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                    intermediate_size=32, sliding_window=9)),
    # q/k norm, top-2 not renormalised (norm_topk_prob false), layer 1 dense (mlp_only_layers)
    "qwen3_moe": (Qwen3MoeConfig, dict(num_key_value_heads=1, head_dim=32, num_hidden_layers=3, num_experts=4,
                                       num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1],
                                       norm_topk_prob=False)),
    # renormalised top-2, a gated shared expert of 48, layer 0 dense (decoder_sparse_step 2)
    "qwen2_moe": (Qwen2MoeConfig, dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                       decoder_sparse_step=2, norm_topk_prob=True)),
}


def make_hf_model(directory: Path, case: str, seed: int = 0, legacy_rope: bool = False, **overrides) -> Path:
    """Save a random model of `case` to `directory` (safetensors) and return the path.

    legacy_rope rewrites config.json in the transformers-4 style (`rope_theta` + `rope_scaling`),
    as most published checkpoints are.
    """
    config_cls, kwargs = CASES[case] if case in CASES else MOE_CASES[case]
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


BYTE_VOCAB = 384  # <unk> 0, <s> 1, </s> 2, the 256 bytes, then merges learnt from byte_corpus()


def byte_corpus() -> list[str]:
    """JSON documents and sentences that the byte-level BPE tokenizer learns its merges from."""
    words = ["name", "age", "city", "true", "false", "null", "items", "id", "value", "the", "cat", "sat", "on",
             "mat", "Paris", "weather", "tool_call", "arguments", "function"]
    out = []
    for i in range(300):
        w = words[i % 19], words[(i * 7) % 19], words[(i * 3) % 19]
        out.append(json.dumps({w[0]: i, w[1]: w[2], "list": [i, i + 1.5, None, True]}))
        out.append(" ".join(words[(i * k) % 19] for k in range(1, 9)) + ".")
    return out


def add_byte_tokenizer(directory: Path, special_tokens: tuple[str, ...] = (), chat_template: str | None = None) -> Path:
    """A byte-level BPE tokenizer (Llama 3 / Qwen style: any text encodes, multi-byte tokens such as
    '{"', '":', 'Ġ12') of BYTE_VOCAB tokens, plus `special_tokens` after them, trained
    deterministically with `tokenizers` and saved as HF files. The model's vocab_size must cover it.
    chat_template: a name of tests/chat_templates.py TEMPLATES (adds its tokens too) or None."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BYTE_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(byte_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat_template is not None:
        from chat_templates import TEMPLATES

        hf.chat_template, special, plain = TEMPLATES[chat_template]
        special_tokens = tuple(special_tokens) + special
        hf.add_tokens(list(plain))
    if special_tokens:
        hf.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    hf.save_pretrained(directory)
    return directory
