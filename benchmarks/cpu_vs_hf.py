"""trtc's CPU path against HF transformers on the same machine, side by side in one run.

books-16M (tests' fixture), engines built from it as float32 and as stored (bf16), the same model
in HF transformers with the same dtype and thread count:

    batch-1 decode       ISL/OSL 128/128, one request, greedy, end to end (prefill included)
    64 in flight         64 requests of 128/128 (trtc: in-flight batching; HF: one static batch of 64)
    perplexity           windows of BOS + 511 tokens of Alice (trtc: `trtc eval`'s code, 8 windows a
                         step; HF: forward of the same windows, 8 at a time)

Each row prints tokens/s (or seconds) of both and the ratio trtc / HF (> 1: trtc faster).

    python benchmarks/cpu_vs_hf.py [--fixtures ../shared/fixtures] [--quick] [--output_json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def trtc_generate(executor, prompts: list[list[int]], osl: int) -> None:
    from trtc.runtime.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=osl, end_id=-1)
    for p in prompts:
        executor.add_request(p, params)
    executor.run_until_complete()


def hf_generate(model, prompts: list[list[int]], osl: int) -> None:
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=osl, min_new_tokens=osl,
                             do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + osl


def hf_perplexity(model, windows: list[list[int]], per_step: int = 8) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(windows), per_step):
            group = windows[i : i + per_step]
            n = min(len(w) for w in group)
            ids = torch.tensor([w[:n] for w in group])
            logits = model(ids).logits.float()
            logp = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
            nll -= float(logp.sum())
            count += logp.numel()
    return float(torch.exp(torch.tensor(nll / count)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default=str(ROOT.parent / "shared" / "fixtures"))
    ap.add_argument("--quick", action="store_true", help="16 in flight, 32 new tokens, 4 windows")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--output_json")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trtc.compiler.build import build_from_hf
    from trtc.formats.build_config import BuildConfig
    from trtc.quantization.calibration import token_windows
    from trtc.runtime.executor import Executor
    from trtc.tools.perplexity import perplexity

    fixtures = Path(args.fixtures)
    hf_dir = fixtures / "books-16M"
    if not hf_dir.is_dir():
        print(f"{hf_dir} is absent; pass --fixtures", file=sys.stderr)
        return 1
    isl, osl = 128, (32 if args.quick else 128)
    in_flight, num_windows = (16 if args.quick else 64), (4 if args.quick else 20)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    text = (fixtures / "text" / "alice_in_wonderland.txt").read_text()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    windows = [w for w in token_windows(ids[: num_windows * 511], 512, 1) if len(w) >= 2]
    scored = sum(len(w) - 1 for w in windows)
    vocab = 8192
    rows = []

    def row(name: str, unit: str, ours: float, theirs: float, higher_is_better: bool = True) -> None:
        ratio = ours / theirs if higher_is_better else theirs / ours
        rows.append({"row": name, "unit": unit, "trtc": ours, "hf": theirs, "ratio": ratio})
        print(f"{name:<44} trtc {ours:10.2f}  HF {theirs:10.2f} {unit:<6} {ratio:5.2f}x", flush=True)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ISL/OSL {isl}/{osl}, "
          f"{in_flight} in flight, perplexity over {scored} tokens", flush=True)
    with tempfile.TemporaryDirectory(prefix="trtc-cpu-bench-") as tmp:
        for dtype in args.dtypes.split(","):
            engine = build_from_hf(hf_dir, Path(tmp) / dtype, dtype=dtype, build_config=BuildConfig(max_seq_len=1024),
                                   progress=False)
            ex = Executor(engine, device="cpu", enable_prefix_reuse=False)  # as `trtc eval`: every position scored
            model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=getattr(torch, dtype)).eval()
            one = random_prompts(1, isl, vocab, seed=1)
            many = random_prompts(in_flight, isl, vocab, seed=2)
            for warm in (lambda: trtc_generate(ex, one, 4), lambda: hf_generate(model, one, 4)):
                warm()
            row(f"batch-1 decode {isl}/{osl}, {dtype}", "tok/s", osl / timed(lambda: trtc_generate(ex, one, osl)),
                osl / timed(lambda: hf_generate(model, one, osl)))
            row(f"{in_flight} requests {isl}/{osl} in flight, {dtype}", "tok/s",
                in_flight * osl / timed(lambda: trtc_generate(ex, many, osl)),
                in_flight * osl / timed(lambda: hf_generate(model, many, osl)))
            got = {}
            t_ours = timed(lambda: got.setdefault("trtc", perplexity(ex, ids[: num_windows * 511], 512, 1)))
            t_hf = timed(lambda: got.setdefault("hf", hf_perplexity(model, windows)))
            row(f"perplexity, {scored} tokens, {dtype}", "s", t_ours, t_hf, higher_is_better=False)
            print(f"{'':<44} perplexity trtc {got['trtc'].perplexity:.3f}  HF {got['hf']:.3f}", flush=True)
            ex.close()
            model = None  # free it before the next dtype's
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
