"""Guided decoding cost: the per-token cost of a JSON-schema mask, and engine throughput with a schema on
every request against none, at batch 1 and 64.

    python benchmarks/guided_decoding.py [--vocab 128256] [--batch 1 64] [--steps 64] [--device cpu]

The tokenizer is a byte-level BPE (Llama 3 style) trained by `tokenizers` on the public-domain books in
../shared/fixtures/text (or a built-in corpus), its vocabulary filled up to --vocab with made-up word
tokens: no download, and a vocabulary as large as Llama 3's, which is what the mask cost scales with.

1. Mask, per step of a batch of B requests, each teacher-forced through the same valid JSON document
   (its tokens): fill (xgrammar's BatchGrammarMatcher: threads over the batch, on the host), apply
   (xgrammar's apply_token_bitmask_inplace on [B, vocab] f32 logits on --device), accept (each matcher
   advances). Median microseconds over --steps steps.
2. Engine: a tiny random Llama (hidden 64, 1 layer) with that vocabulary, B requests of --max_tokens
   tokens, with no grammar and with the schema on every request: output tokens per second (the forward is
   tiny, so the mask's share here is far larger than on an 8B model, where the step takes milliseconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/kernels.py would shadow the `kernels` package transformers imports
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT / "tests"))
import torch  # noqa: E402
import xgrammar as xgr  # noqa: E402

# tiny random models from configs
from models import byte_corpus, make_hf_model  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "email", "tags", "address"],
}
DOCUMENT = {"name": "Elizabeth Bennet", "age": 20, "email": "elizabeth@longbourn.example",
            "tags": ["sister", "reader", "walker"], "address": {"city": "Meryton", "zip": "HP1 2AB"}}


def make_tokenizer(directory: Path, vocab: int):
    """A byte-level BPE of `vocab` tokens saved as HF files; returns the loaded tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    texts = ROOT.parent / "shared" / "fixtures" / "text"
    corpus = [p.read_text() for p in sorted(texts.glob("*.txt"))] if texts.is_dir() else []
    corpus += byte_corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    letters = "abcdefghijklmnopqrstuvwxyz"
    extra, i = [], 0
    while tok.get_vocab_size() + len(extra) < vocab:  # made-up words 'Ġqux', 'zab', ... up to the size
        n, word = i, ""
        while True:
            word += letters[n % 26]
            n //= 26
            if n == 0:
                break
        extra += ["Ġ" + word + "q", word + "q"]
        i += 1
    tok.add_tokens(extra[: vocab - tok.get_vocab_size()])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def mask_cost(tokenizer, vocab: int, batch: int, steps: int, device: str) -> dict:
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, cache_enabled=True)
    t = time.perf_counter()
    grammar = compiler.compile_json_schema(SCHEMA, any_whitespace=False)
    compile_ms = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    compiler.compile_json_schema(SCHEMA, any_whitespace=False)
    cached_ms = (time.perf_counter() - t) * 1e3
    ids = tokenizer(json.dumps(DOCUMENT), add_special_tokens=False).input_ids
    matchers = [xgr.GrammarMatcher(grammar) for _ in range(batch)]
    filler = xgr.BatchGrammarMatcher()
    host = xgr.allocate_token_bitmask(batch, vocab)
    logits = torch.randn(batch, vocab, device=device)
    rows = list(range(batch))
    fill, apply, accept = [], [], []
    for k in range(min(steps, len(ids))):
        t0 = time.perf_counter()
        filler.batch_fill_next_token_bitmask(matchers, host)
        t1 = time.perf_counter()
        xgr.apply_token_bitmask_inplace(logits, host.to(device, non_blocking=True), vocab_size=vocab, indices=rows)
        if device != "cpu":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        assert all(m.accept_token(ids[k]) for m in matchers)
        t3 = time.perf_counter()
        fill.append(t1 - t0), apply.append(t2 - t1), accept.append(t3 - t2)
    us = lambda xs: statistics.median(xs) * 1e6  # noqa: E731
    return dict(batch=batch, steps=len(fill), compile_ms=round(compile_ms, 1), cached_compile_ms=round(cached_ms, 3),
                fill_us=round(us(fill), 1), apply_us=round(us(apply), 1), accept_us=round(us(accept), 1),
                per_token_us=round((us(fill) + us(apply) + us(accept)) / batch, 1))


def engine_throughput(hf_dir: Path, work: Path, vocab: int, batches: list[int], max_tokens: int, device: str) -> list[dict]:
    from trtc.compiler.build import build_from_hf
    from trtc.formats.build_config import BuildConfig
    from trtc.llm import LLM
    from trtc.runtime.sampling_params import GuidedDecodingParams, SamplingParams

    config = BuildConfig(max_batch_size=max(batches), max_num_tokens=2048, tokens_per_block=16, max_seq_len=256)
    engine = build_from_hf(hf_dir, work / "engine", dtype="float32", build_config=config, progress=False)
    # an array of at least max_tokens integers: every request runs to max_tokens, as without a schema
    guided = GuidedDecodingParams(json={"type": "array", "items": {"type": "integer"}, "minItems": max_tokens})
    results = []
    with LLM(engine, device=device) as llm:
        for batch in batches:
            prompts = [[1, 5 + i, 6, 7] for i in range(batch)]
            row = {"batch": batch}
            for name, g in (("none", None), ("json_schema", guided)):
                params = SamplingParams(max_tokens=max_tokens, end_id=-1, temperature=1.0, seed=0, guided_decoding=g)
                llm.generate(prompts[:1], params)  # warm-up (and, with a schema, its compilation)
                t = time.perf_counter()
                outs = llm.generate(prompts, params)
                seconds = time.perf_counter() - t
                assert all(len(o.token_ids) == max_tokens for o in outs)
                row[f"{name}_tok_s"] = round(sum(len(o.token_ids) for o in outs) / seconds, 1)
            row["loss_pct"] = round(100 * (1 - row["json_schema_tok_s"] / row["none_tok_s"]), 1)
            results.append(row)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip_engine", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        tokenizer = make_tokenizer(work / "hf", args.vocab)
        print(f"tokenizer: {len(tokenizer)} tokens ({time.perf_counter() - t:.0f} s to make)")
        for batch in args.batch:
            print("mask", json.dumps(mask_cost(tokenizer, args.vocab, batch, args.steps, args.device)))
        if not args.skip_engine:
            make_hf_model(work / "hf", "llama3_gqa", vocab_size=args.vocab, num_hidden_layers=1)
            for row in engine_throughput(work / "hf", work, args.vocab, args.batch, args.max_tokens, args.device):
                print("engine", json.dumps(row))


if __name__ == "__main__":
    main()
