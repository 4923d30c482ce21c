"""Tensor parallelism on GPUs: tp 1 against tp 2 on Llama-3.1-8B shapes, bf16 and FP8, in one run.

    python benchmarks/tp_gpu.py [--work_dir DIR] [--quick] [--dtypes bf16,fp8] [--keep] [--output_json F]

Makes a random-weight HF checkpoint of Llama-3.1-8B shape from a config (no download), builds
bf16 engines for tp 1 and tp 2, calibrates FP8 once with ModelOpt on random tokens (the weights
are random too) and converts that one export for tp 1 and tp 2, then measures each engine, in a
process of its own, with `trtc bench`'s code: batch-1 TPOT (ISL 128 / OSL 128, latency mode; MBU
per GPU) and throughput (ISL/OSL 128/128, concurrency 256). Each engine is deleted once measured, and the work directory
at the end unless --keep. Prints one table last. Needs two GPUs; 6-8 minutes on 2 x H200.
--quick: a ~1.5B model of the same family and fewer requests (a smoke run of the whole path).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_engine import LLAMA_8B, QUICK, make_checkpoint  # noqa: E402

from trtc.compiler.build import build, build_from_hf  # noqa: E402
from trtc.formats.build_config import BuildConfig  # noqa: E402

ISL = OSL = 128
CONFIG = BuildConfig(max_batch_size=256, max_seq_len=2048, max_num_tokens=8192)


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def fp8_export(hf_dir: Path, out: Path, vocab: int) -> float:
    """ModelOpt FP8 (weights and activations, max calibration) on 16 windows of random tokens, exported once."""
    from transformers import AutoModelForCausalLM

    from trtc.quantization.quantize import calibrate, export

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16, device_map="cuda").eval()
    g = torch.Generator().manual_seed(0)
    calibrate(model, "fp8", [torch.randint(100, vocab, (4, 256), generator=g) for _ in range(4)])
    export(model, out)
    del model
    torch.cuda.empty_cache()
    return time.perf_counter() - start


def build_fp8(export_dir: Path, engine: Path, tp: int) -> None:
    from trtc.converters.convert import convert

    ckpt = engine.parent / f"{engine.name}-ckpt"
    convert(export_dir, ckpt, tp_size=tp, dtype="bfloat16", progress=False)
    build(ckpt, engine, CONFIG, progress=False)
    shutil.rmtree(ckpt)


def measure_in_subprocess(engine: Path, requests: int) -> dict:
    """`measure` in a process of its own, which gives all of the GPUs' memory back when it ends."""
    out = engine.parent / f"{engine.name}-result.json"
    code = subprocess.run([sys.executable, __file__, "--measure", str(engine), "--requests", str(requests),
                           "--output_json", str(out)]).returncode
    if not out.is_file():
        raise SystemExit(f"measuring {engine.name} failed (exit code {code})")
    if code:  # its results were written: a crash while the process ends does not void them
        print(f"warning: the process that measured {engine.name} exited with code {code} after writing its results")
    return json.loads(out.read_text())


def measure(engine: Path, requests: int) -> dict:
    """Load, batch-1 latency, throughput; the engine is closed (its ranks stopped) after."""
    from trtc.runtime.executor import Executor
    from trtc.tools.bench import bench, format_result

    ex = Executor(engine)
    try:
        lat = bench(ex, ISL, OSL, latency=True, batch_size=1)
        print(format_result(lat), flush=True)
        tput = bench(ex, ISL, OSL, requests, concurrency=256)
        print(format_result(tput), flush=True)
    finally:
        ex.close()
    return {"load_s": ex.load_seconds, "tpot_ms": lat.tpot_ms["mean"], "mbu": lat.mbu, "tput": tput.output_tokens_per_s,
            "requests": requests}


def run(args, work: Path) -> dict:
    shape = QUICK if args.quick else LLAMA_8B
    hf_dir = work / "hf"
    start = time.perf_counter()
    n = make_checkpoint(hf_dir, shape) or sum(f.stat().st_size for f in hf_dir.glob("*.safetensors")) // 2  # bf16
    print(f"checkpoint: {n / 1e9:.2f}B parameters, ready in {time.perf_counter() - start:.0f} s", flush=True)
    requests = 128 if args.quick else 512
    results = {"model": "quick (~1.5B)" if args.quick else "Llama-3.1-8B shape", "params": n}
    dtypes = args.dtypes.split(",")
    if "bf16" in dtypes:
        for tp in (1, 2):
            engine = work / f"bf16_tp{tp}"
            build_s = timed(build_from_hf, hf_dir, engine, tp_size=tp, dtype="bfloat16", build_config=CONFIG,
                            progress=False)
            print(f"bf16 tp {tp}: built in {build_s:.1f} s", flush=True)
            results[f"bf16 tp{tp}"] = {"build_s": build_s, **measure_in_subprocess(engine, requests)}
            shutil.rmtree(engine)
    if "fp8" in dtypes:
        export_dir = work / "fp8_hf"
        results["fp8_calibration_s"] = fp8_export(hf_dir, export_dir, shape["vocab_size"])
        for tp in (1, 2):
            engine = work / f"fp8_tp{tp}"
            build_s = timed(build_fp8, export_dir, engine, tp)
            print(f"fp8 tp {tp}: converted and built in {build_s:.1f} s", flush=True)
            results[f"fp8 tp{tp}"] = {"build_s": build_s, **measure_in_subprocess(engine, requests)}
            shutil.rmtree(engine)
    return results


def table(r: dict) -> None:
    print(f"\n{r['model']}, {r['params'] / 1e9:.2f}B parameters, random weights; ISL/OSL {ISL}/{OSL}; "
          f"{torch.cuda.get_device_name()}")
    print(f"{'engine':<10}{'GPUs':>5}{'build s':>9}{'load s':>8}{'b1 TPOT ms':>12}{'b1 tok/s':>10}{'MBU/GPU':>9}"
          f"{'tput tok/s':>12}{'requests':>10}")
    for name in ("bf16 tp1", "bf16 tp2", "fp8 tp1", "fp8 tp2"):
        if name in r:
            e = r[name]
            print(f"{name:<10}{name[-1]:>5}{e['build_s']:>9.1f}{e['load_s']:>8.1f}{e['tpot_ms']:>12.2f}"
                  f"{1e3 / e['tpot_ms']:>10.1f}{100 * e['mbu']:>8.1f}%{e['tput']:>12,.0f}{e['requests']:>10}")
    for dtype in ("bf16", "fp8"):
        if f"{dtype} tp2" in r:
            one, two = r[f"{dtype} tp1"], r[f"{dtype} tp2"]
            print(f"{dtype}: tp 2 against tp 1: batch-1 TPOT x{two['tpot_ms'] / one['tpot_ms']:.2f} "
                  f"({one['tpot_ms'] / two['tpot_ms']:.2f}x faster), throughput x{two['tput'] / one['tput']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work_dir", default=None, help="[default: /tmp/trtc-tp-bench-8b, or -quick]")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtypes", default="bf16,fp8", help="engines to measure: bf16, fp8 or both")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (the HF checkpoint)")
    ap.add_argument("--output_json", default=None)
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # one engine, in a subprocess
    ap.add_argument("--requests", type=int, default=512, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        Path(args.output_json).write_text(json.dumps(measure(Path(args.measure), args.requests)))
        return
    if torch.cuda.device_count() < 2:
        sys.exit(f"tp_gpu.py needs two GPUs, {torch.cuda.device_count()} found")
    work = Path(args.work_dir or f"/tmp/trtc-tp-bench-{'quick' if args.quick else '8b'}")
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        results = run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = time.perf_counter() - start
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2) + "\n")
    table(results)
    print(f"total {results['total_s']:.0f} s")


if __name__ == "__main__":
    main()
