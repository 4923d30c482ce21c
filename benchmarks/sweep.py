"""A concurrency sweep of trtc against HF transformers on the same machine and requests, for the plots.

    python benchmarks/sweep.py MODEL_DIR --output_json sweep.json [--concurrency 1,4,16,64] [--isl 128]
        [--osl 128] [--num_requests 64] [--device cpu|cuda] [--dtype bfloat16] [--label "H100 80GB, ..."]
    python benchmarks/plot_bench.py sweep.json --out docs/img

trtc: `trtc bench --engine_dir ENGINE --concurrency LIST --output_json` (an engine built from MODEL_DIR,
in a process of its own). HF transformers: the same number of requests of the same lengths, run as
static batches of each concurrency (`generate`, greedy, exactly OSL new tokens each); its per-user rate
is OSL over a batch's time (prefill included). The JSON holds both, the machine, the date and the
commands. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def trtc_sweep(model: Path, work: Path, a) -> tuple[list[dict], list[str]]:
    engine = work / "engine"
    build = [sys.executable, "-m", "trtc.cli", "build", "--model_dir", str(model), "--output_dir", str(engine),
             "--dtype", a.dtype, "--max_batch_size", str(max(a.levels)), "--quiet"]
    bench = [sys.executable, "-m", "trtc.cli", "bench", "--engine_dir", str(engine), "--isl", str(a.isl),
             "--osl", str(a.osl), "--num_requests", str(a.num_requests),
             "--concurrency", ",".join(map(str, a.levels)), "--output_json", str(work / "trtc.json"), "--quiet"]
    for cmd in (build, bench):
        subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((work / "trtc.json").read_text()), [" ".join(c[2:]) for c in (build, bench)]


def hf_sweep(model: Path, a) -> list[dict]:
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[a.dtype]
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(a.device).eval()
    vocab = hf.config.vocab_size
    g = torch.Generator().manual_seed(0)
    out = []
    for c in a.levels:
        batches = [min(c, a.num_requests - k) for k in range(0, a.num_requests, c)]
        batch_seconds = []
        for b in [batches[0], *batches]:  # the first is a warm-up
            ids = torch.randint(3, vocab, (b, a.isl), generator=g).to(a.device)
            if a.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.inference_mode():
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.osl, min_new_tokens=a.osl,
                            do_sample=False, pad_token_id=0)
            if a.device == "cuda":
                torch.cuda.synchronize()
            batch_seconds.append(time.perf_counter() - start)
        seconds = sum(batch_seconds[1:])
        per_user = [a.osl / s for s in batch_seconds[1:]]
        out.append({"concurrency": c, "num_requests": a.num_requests, "isl": a.isl, "osl": a.osl, "seconds": seconds,
                    "output_tokens_per_s": a.num_requests * a.osl / seconds,
                    "per_user_tokens_per_s": sum(per_user) / len(per_user)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="an HF model directory")
    ap.add_argument("--output_json", type=Path, required=True)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=128)
    ap.add_argument("--num_requests", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--label", default=None, help="the machine, for the plots' titles [default: the device's name]")
    a = ap.parse_args()
    a.levels = sorted({min(int(c), a.num_requests) for c in a.concurrency.split(",")})  # trtc bench caps them so
    if not (a.model / "config.json").exists():
        raise SystemExit(f"{a.model} is not an HF model directory (no config.json)")
    device_name = (torch.cuda.get_device_name() if a.device == "cuda"
                   else f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})")
    with tempfile.TemporaryDirectory(prefix="trtc-sweep-") as work:
        trtc, commands = trtc_sweep(a.model, Path(work), a)
    hf = hf_sweep(a.model, a)
    for r in trtc:
        r["per_user_tokens_per_s"] = 1000 / r["tpot_ms"]["mean"] if r["tpot_ms"]["mean"] else math.nan
    data = {"label": a.label or device_name, "device": device_name, "date": datetime.date.today().isoformat(),
            "model": a.model.name, "dtype": a.dtype, "isl": a.isl, "osl": a.osl, "commands": commands,
            "command": " ".join(sys.argv), "trtc": trtc, "peers": {"HF transformers": hf}}
    a.output_json.write_text(json.dumps(data, indent=2) + "\n")
    print(f"{'concurrency':>11} {'trtc tok/s':>10} {'HF tok/s':>9} {'ratio':>6}")
    for t, h in zip(trtc, hf):
        print(f"{t['concurrency']:>11} {t['output_tokens_per_s']:>10,.1f} {h['output_tokens_per_s']:>9,.1f} "
              f"{t['output_tokens_per_s'] / h['output_tokens_per_s']:>5.2f}x")


if __name__ == "__main__":
    main()
