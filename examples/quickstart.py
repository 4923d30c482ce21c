"""Quickstart: a tiny Llama built from a config (random weights, no download) goes through
`trtc convert` -> `trtc build` -> `trtc run`, and its greedy output is checked against HF transformers.

    python examples/quickstart.py [--work_dir DIR] [--model_dir HF_DIR]

With --model_dir (e.g. ../shared/fixtures/stories260K, a small real model) it uses that model instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

CORPUS = __doc__ * 20 + "Once upon a time there was a compiler that turned models into engines. " * 50


def make_tiny_llama(path: Path) -> None:
    """Random weights and a byte-level BPE tokenizer trained on a few sentences, saved as an HF dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=512, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, initializer_range=0.2,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def trtc(*args: str) -> None:
    print("$ trtc", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "trtc.cli", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work_dir", default=None)
    ap.add_argument("--model_dir", default=None, help="an HF model directory to use instead of a random one")
    args = ap.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="trtc-quickstart-"))
    hf_dir = Path(args.model_dir) if args.model_dir else work / "tiny-llama"
    if not args.model_dir:
        make_tiny_llama(hf_dir)
        print(f"tiny random Llama saved to {hf_dir}")

    trtc("convert", "--model_dir", str(hf_dir), "--output_dir", str(work / "ckpt"), "--dtype", "float32", "--overwrite")
    trtc("build", "--checkpoint_dir", str(work / "ckpt"), "--output_dir", str(work / "engine"), "--overwrite")
    trtc("run", "--engine_dir", str(work / "engine"), "--input_text", "Once upon a time", "--max_output_len", "24",
         "--output_json", str(work / "output.json"))

    record = json.loads((work / "output.json").read_text())[0]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(hf_dir)("Once upon a time").input_ids
    expected = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    same = record["output_ids"] == expected
    print(f"trtc greedy tokens equal HF transformers generate: {'yes' if same else 'NO'}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
