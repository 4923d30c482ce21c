"""`trtc eval`: perplexity through the runtime equals the same windows scored by HF transformers;
on books-16M a quantized engine reproduces ModelOpt's fake-quantized model."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
from click.testing import CliRunner
from models import WORDS, add_word_tokenizer, load_hf, make_hf_model

from trtc.cli import main
from trtc.compiler.build import build, build_from_hf
from trtc.converters.convert import convert
from trtc.formats.build_config import BuildConfig
from trtc.quantization.calibration import calibration_batches, token_windows
from trtc.runtime.executor import Executor
from trtc.tools.perplexity import perplexity


def hf_perplexity(model, ids: list[int], window_len: int, bos: int | None) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in token_windows(ids, window_len, bos):
            logits = model(torch.tensor([w])).logits[0, :-1].double()
            nll -= float(torch.log_softmax(logits, -1).gather(1, torch.tensor(w[1:])[:, None]).sum())
            count += len(w) - 1
    return math.exp(nll / count)


def test_runtime_perplexity_equals_hf(tmp_path):
    hf = make_hf_model(tmp_path / "hf", "llama3_gqa")
    # a token budget of 24 and blocks of 4: windows are prefilled in chunks, several per step
    engine = build_from_hf(hf, tmp_path / "engine", dtype="float32", progress=False,
                           build_config=BuildConfig(max_num_tokens=24, tokens_per_block=4, max_seq_len=64))
    ids = torch.randint(3, 131, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    ex = Executor(engine, kv_cache_max_tokens=512, enable_prefix_reuse=False)
    r = perplexity(ex, ids, window_len=40, bos=1, windows_per_step=3)
    assert r.tokens == 200  # every text token is scored, the first of each window from BOS
    want = hf_perplexity(load_hf(hf), ids, 40, 1)
    assert abs(r.perplexity / want - 1) < 1e-5, (r.perplexity, want)
    assert not ex.has_unfinished() and not ex.requests


def test_eval_cli(tmp_path):
    hf = add_word_tokenizer(make_hf_model(tmp_path / "hf", "llama3_gqa"))
    engine = tmp_path / "engine"
    assert CliRunner().invoke(main, ["build", "--model_dir", str(hf), "--output_dir", str(engine),
                                     "--max_seq_len", "64"]).exit_code == 0
    text = tmp_path / "t.txt"
    text.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(300)))

    def run(*args):
        return CliRunner().invoke(main, ["eval", "--engine_dir", str(engine), *map(str, args)])

    result = run("--dataset", text, "--window_len", 32, "--max_tokens", 100)
    assert result.exit_code == 0, result.output
    row = result.output.strip().splitlines()[-1].split()
    assert row[0] == "t.txt" and row[1] == "100" and float(row[2]) > 1
    for args, words in [(("--dataset", tmp_path / "none.txt"), ["none.txt", "does not exist"]),
                        (("--dataset", text, "--window_len", 64), ["--window_len 64", "max_seq_len"]),
                        ((), ["--dataset"])]:
        bad = run(*args)
        assert bad.exit_code != 0 and "Traceback" not in bad.output
        assert all(w in bad.output for w in words), bad.output


@pytest.mark.slow
def test_books_fp8_engine_reproduces_modelopt(fixtures_dir, tmp_path):
    """FP8 weights and activations plus an FP8 KV cache on books-16M (16 calibration windows): the
    engine's perplexity on 32 windows of Alice equals that of ModelOpt's fake-quantized model to
    0.4%; the quantization itself moves it by well under 2% from the unquantized model.

    The two compute the same function (given the same input, each quantized linear layer's output
    agrees to 4e-7), but not bit for bit: fp32 rounding differs (paged against dense attention,
    the norm's reduction), and an FP8 rounding that flips on a last-bit difference changes one
    activation by an ulp (6%), which flips more roundings downstream. So each perplexity is one
    draw of the FP8 rounding noise: perturbing the embeddings by 1e-6 (relative) moves the
    engine's by sd 0.05% on these 16,352 tokens (0.18% on 4,088) and the fake-quantized model's
    by 0.04%. 0.4% is 4 sd of their difference; the quantization moves perplexity by 0.5%."""
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers
    from transformers import AutoTokenizer

    from trtc.quantization.quantize import calibrate, export

    hf_dir, text = fixtures_dir / "books-16M", fixtures_dir / "text"
    tok = AutoTokenizer.from_pretrained(hf_dir)
    batches = calibration_batches(tok, [text / "pride_and_prejudice.txt"], 16, 512, 8, 1)
    ids = tok((text / "alice_in_wonderland.txt").read_text(), add_special_tokens=False).input_ids[:32 * 511]
    model = load_hf(hf_dir)
    base = hf_perplexity(model, ids, 512, 1)
    calibrate(model, "fp8", batches, kv_cache_fp8=True)
    with contextlib.redirect_stdout(io.StringIO()):
        requantize_resmooth_fused_llm_layers(model)
    fake = hf_perplexity(model, ids, 512, 1)
    export(model, tmp_path / "hf")
    for f in hf_dir.glob("tokenizer*"):
        (tmp_path / "hf" / f.name).write_bytes(f.read_bytes())
    convert(tmp_path / "hf", tmp_path / "ckpt", dtype="float32", progress=False)
    engine = build(tmp_path / "ckpt", tmp_path / "engine", progress=False)
    got = perplexity(Executor(engine, kv_cache_max_tokens=8192), ids, 512, 1).perplexity
    print(f"books-16M alice {len(ids)} tokens: fp32 {base:.3f} fake-quant {fake:.3f} engine {got:.3f}")
    assert abs(got / fake - 1) < 4e-3, (got, fake, base)
    assert 0 < abs(fake / base - 1) < 0.02, (fake, base)
