"""Accuracy of trtc's quantized engines on books-16M: perplexity on held-out books, engine vs
ModelOpt's fake-quantized model vs the unquantized model (the fixture README's protocol).

    python benchmarks/quant_accuracy.py [--formats bf16,fp8,fp8_kv,int4_awq,int4_awq_clip,int4_gptq] [--requant] [--json out.json]

For each format: ModelOpt calibrates the float32 HF model on `--calib_size` windows of 512 tokens
(BOS first) from pride_and_prejudice.txt; the fake-quantized model is scored by HF transformers
(float32) as calibrated, and again after the first step of ModelOpt's export
(requantize_resmooth_fused_llm_layers: AWQ's q/k/v and gate/up get one pre_quant_scale), which is
the model the export describes; then the export goes through trtc convert + build, and the
engines (float32, and bfloat16 as deployed) are scored through the runtime (`trtc eval`'s code).
Perplexity: the first 60,000 tokens of each text (all 40,624 of Alice) in windows of BOS + 511.
For FP8, `--requant` also scores the alternative layout for fused qkv / gate_up (one weight scale,
the max of the parts', each part requantized to it) with the reference forward.
Takes about 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the oracle forward is a test oracle
FIXTURES = ROOT.parent / "shared" / "fixtures"
TEXTS = ("adventures_of_sherlock_holmes", "alice_in_wonderland")
FORMATS = {"bf16": None, "fp8": ("fp8", False, "lite"), "fp8_kv": ("fp8", True, "lite"),
           "int4_awq": ("int4_awq", False, "lite"), "int4_awq_clip": ("int4_awq", False, "clip"),
           "int4_gptq": ("int4_gptq", False, "lite")}


def hf_perplexity(model, ids: list[int], window_len: int = 512, batch: int = 8) -> float:
    from trtc.quantization.calibration import token_windows

    windows = token_windows(ids, window_len, 1)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            group = windows[i : i + batch]
            for w in ([g] for g in group) if len({len(g) for g in group}) > 1 else [group]:
                x = torch.tensor(w)
                logp = torch.log_softmax(model(x).logits[:, :-1].double(), -1)
                nll -= float(logp.gather(2, x[:, 1:, None]).sum())
                count += x[:, 1:].numel()
    return math.exp(nll / count)


def engine_perplexity(engine: Path, ids: list[int]) -> float:
    from trtc.runtime.executor import Executor
    from trtc.tools.perplexity import perplexity

    with contextlib.redirect_stdout(io.StringIO()):
        ex = Executor(engine, kv_cache_max_tokens=16384, enable_prefix_reuse=False)
    return perplexity(ex, ids, 512, 1).perplexity


def requantized_perplexity(ckpt: Path, ids: list[int]) -> float:
    """The FP8 checkpoint with every q/k/v and gate/up part requantized to the max scale of its group."""
    from oracles.reference import ReferenceModel

    from trtc.formats.quant_layout import quantize_fp8
    from trtc.quantization.calibration import token_windows

    ref = ReferenceModel.from_checkpoint(ckpt)
    w = ref.ranks[0]
    for i in range(ref.graph.num_layers):
        for group in (("attention.q", "attention.k", "attention.v"), ("mlp.gate", "mlp.up")):
            top = max(w[f"layers.{i}.{m}.weight_scale"] for m in group)
            for m in group:
                p = f"layers.{i}.{m}."
                w[p + "weight"] = quantize_fp8(w[p + "weight"].float() * w[p + "weight_scale"], top)
                w[p + "weight_scale"] = top
    nll, count = 0.0, 0
    for win in token_windows(ids, 512, 1):
        logp = torch.log_softmax(ref.forward(torch.tensor([win]), ref.new_cache())[0, :-1].double(), -1)
        nll -= float(logp.gather(1, torch.tensor(win[1:])[:, None]).sum())
        count += len(win) - 1
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--calib_size", type=int, default=64)
    ap.add_argument("--max_tokens", type=int, default=60000)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--requant", action="store_true", help="FP8: also score fused parts requantized to one scale")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trtc.compiler.build import build
    from trtc.converters.convert import convert
    from trtc.quantization.calibration import calibration_batches
    from trtc.quantization.quantize import calibrate, export

    hf_dir, text_dir = FIXTURES / "books-16M", FIXTURES / "text"
    tok = AutoTokenizer.from_pretrained(hf_dir)
    texts = {t: tok((text_dir / f"{t}.txt").read_text(), add_special_tokens=False).input_ids[: args.max_tokens]
             for t in TEXTS}
    batches = calibration_batches(tok, [text_dir / "pride_and_prejudice.txt"], args.calib_size, 512, 8, 1)
    results = []
    for fmt in args.formats.split(","):
        row = {"format": fmt}
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            if FORMATS[fmt] is None:
                row["hf_fake_quant"] = {t: hf_perplexity(model, ids) for t, ids in texts.items()}
                src = hf_dir
            else:
                qformat, kv, awq_algorithm = FORMATS[fmt]
                start = time.time()
                calibrate(model, qformat, batches, kv, awq_algorithm=awq_algorithm)
                row["calibrate_s"] = round(time.time() - start, 1)
                row["hf_fake_quant"] = {t: hf_perplexity(model, ids) for t, ids in texts.items()}
                if fmt == "int4_awq":  # the only format the export's resmoothing changes (pre_quant_scale)
                    with contextlib.redirect_stdout(io.StringIO()):
                        requantize_resmooth_fused_llm_layers(model)
                    row["hf_fake_quant_exported"] = {t: hf_perplexity(model, ids) for t, ids in texts.items()}
                export(model, tmp / "hf")
                for f in hf_dir.glob("tokenizer*"):
                    (tmp / "hf" / f.name).write_bytes(f.read_bytes())
                src = tmp / "hf"
            for dtype in ("float32", "bfloat16"):
                convert(src, tmp / f"ckpt_{dtype}", dtype=dtype, progress=False)
                engine = build(tmp / f"ckpt_{dtype}", tmp / f"engine_{dtype}", progress=False)
                row[f"engine_{dtype}"] = {t: engine_perplexity(engine, ids) for t, ids in texts.items()}
            if args.requant and fmt == "fp8":
                row["fp8_requantized_fp32"] = {t: requantized_perplexity(tmp / "ckpt_float32", ids)
                                               for t, ids in texts.items()}
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def print_table(results: list[dict]) -> None:
    base = next((r for r in results if r["format"] == "bf16"), None)
    print("\n| format | text | HF fake-quant (as calibrated) | HF fake-quant (as exported) | engine fp32 | engine vs fake-quant | engine bf16 | vs bf16 model |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        for t in TEXTS:
            fq = r["hf_fake_quant"][t]
            ex = r.get("hf_fake_quant_exported", r["hf_fake_quant"])[t]
            e32, e16 = r["engine_float32"][t], r["engine_bfloat16"][t]
            rel = f"{100 * (e32 / base['hf_fake_quant'][t] - 1):+.2f}%" if base else ""
            print(f"| {r['format']} | {t} | {fq:.2f} | {ex:.2f} | {e32:.2f} | {100 * (e32 / ex - 1):+.3f}% | {e16:.2f} | {rel} |")


if __name__ == "__main__":
    main()
