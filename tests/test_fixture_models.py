"""Greedy generation of the reference forward equals HF `generate` on the real fixture models."""

from __future__ import annotations

import pytest
import torch
from oracles.reference import ReferenceModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from trtc.converters.convert import convert

PROMPTS = ["Once upon a time", "The little dog"]


@pytest.mark.parametrize("model, new_tokens", [("stories260K", 64), ("books-16M", 48)])
def test_greedy_equals_hf_generate(fixtures_dir, tmp_path, model, new_tokens):
    hf_dir = fixtures_dir / model
    convert(hf_dir, tmp_path / "ckpt", dtype="float32", progress=False)
    ref = ReferenceModel.from_checkpoint(tmp_path / "ckpt")
    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt" / "tokenizer")
    assert tok("Once upon a time").input_ids == AutoTokenizer.from_pretrained(hf_dir)("Once upon a time").input_ids
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        with torch.no_grad():
            expected = hf.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert ref.generate_greedy(ids, new_tokens) == expected
    if model == "stories260K":
        text = tok.decode(ref.generate_greedy(tok(PROMPTS[0]).input_ids, 16))
        assert "there was a little girl" in text
