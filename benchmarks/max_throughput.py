"""Max-throughput mode as `trtllm-bench throughput` measures it, beside TensorRT-LLM's published figures.

    python benchmarks/max_throughput.py [--engines bf16,fp8] [--pairs 128/128,128/2048,...]
        [--max_batch_size 2048] [--max_num_tokens 8192] [--max_seconds 60] [--work_dir DIR]

A random-weight HF checkpoint of Llama-3.1-8B shape (benchmarks/gpu_engine.py's make_checkpoint), then
for each engine kind, one at a time (its engine removed before the next is built: the disk is 64 GB):
bf16, and FP8 W8A8 + FP8 KV cache (gpu_engine.py's round-to-nearest synthetic checkpoint, speed only),
built with --max_batch_size 2048 and --max_num_tokens 8192, loaded once in its own process at KV
fraction 0.95, and every ISL/OSL pair run with all requests queued at once (trtc.tools.bench.max_throughput:
steady_state_requests of max_batch_size, each to exactly OSL tokens, under a time budget per pair).
Prints: engine, ISL/OSL, trtc output tok/s, TensorRT-LLM's published figure for this card (Llama 3.1 8B
FP8 TP1; v1.0 / v0.17), the ratio to the higher, and peak allocated against the memory plan.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpu_engine  # noqa: E402


def pairs_of(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in p.split("/")) for p in text.split(",") if p]


def engine_part(args, engine: Path, kind: str) -> list[dict]:
    """Load `engine` once and run every pair; the rows for the table."""
    from trtc.runtime.executor import Executor
    from trtc.tools.bench import format_result, max_throughput

    ex = Executor(engine, free_gpu_memory_fraction=args.kv_fraction)
    print(f"{kind}: {ex.worker.memory_line()}", flush=True)
    torch.cuda.reset_peak_memory_stats()
    rows = []
    try:
        for isl, osl in pairs_of(args.pairs):
            r = max_throughput(ex, isl, osl, args.num_requests, args.max_seconds)
            print(format_result(r), flush=True)
            print(gpu_engine.peak_vs_plan(ex), flush=True)
            rows.append({**r.to_dict(), "engine": kind, "peak": torch.cuda.max_memory_allocated(),
                         "plan": ex.worker.memory_budget(), "load_s": ex.load_seconds})
    finally:
        ex.close()
    return rows


def table(rows: list[dict]) -> None:
    print()
    print(f"{'engine':<12}{'ISL/OSL':>10}{'trtc tok/s':>12}{'published':>18}{'ratio':>8}{'done':>12}  peak / plan")
    for r in rows:
        p = r["published"]
        pub = f"{p['v1.0']:,} / {p['v0.17']:,}" if p else "none"
        ratio = f"{r['output_tokens_per_s'] / p['best']:.2f}x" if p else ""
        done = f"{r['completed']}/{r['num_requests']}"
        print(f"{r['engine']:<12}{r['isl']:>5}/{r['osl']:<4}{r['output_tokens_per_s']:>12,.0f}{pub:>18}{ratio:>8}{done:>12}"
              f"  {r['peak'] / 2**30:.1f} / {r['plan'] / 2**30:.1f} GiB")
    if not rows:
        print("no engine run finished: the table is empty (each run's error is above)")
        return
    card = next((r["published"]["card"] for r in rows if r["published"]), None)
    print(f"published: TensorRT-LLM perf-overview, Llama 3.1 8B FP8 TP1, {card or 'no figure for this card'} "
          "(v1.0 PyTorch backend / v0.17 TensorRT engines); ratio against the higher; not measured here")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work_dir", default="/tmp/trtc-maxtput")
    ap.add_argument("--engines", default="bf16,fp8", help="comma-separated: bf16, fp8")
    ap.add_argument("--pairs", default="128/128", help="ISL/OSL pairs, comma-separated")
    ap.add_argument("--max_batch_size", type=int, default=2048)
    ap.add_argument("--max_num_tokens", type=int, default=8192)
    ap.add_argument("--num_requests", type=int, default=None, help="[default: 3 x max_batch_size, at least 1000]")
    ap.add_argument("--max_seconds", type=float, default=60.0, help="time budget of one pair")
    ap.add_argument("--kv_fraction", type=float, default=0.95)
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)  # one engine in this process
    args = ap.parse_args()
    work = Path(args.work_dir)
    hf_dir = work / "hf"
    if args.part is not None:
        rows = engine_part(args, work / f"engine-{args.part}", args.part)
        (work / f"rows-{args.part}.json").write_text(json.dumps(rows))
        return
    work.mkdir(parents=True, exist_ok=True)
    gpu_engine.make_checkpoint(hf_dir, gpu_engine.LLAMA_8B)
    max_seq_len = max(isl + osl for isl, osl in pairs_of(args.pairs))
    flags = ["--max_seq_len", str(max(256, max_seq_len)), "--max_batch_size", str(args.max_batch_size),
             "--max_num_tokens", str(args.max_num_tokens), "--overwrite"]
    rows = []
    for kind in args.engines.split(","):
        engine = work / f"engine-{kind}"
        seconds = gpu_engine.build_engine(kind, hf_dir, engine, flags)
        print(f"{kind}: built in {seconds:.0f} s ({' '.join(flags)})", flush=True)
        shutil.rmtree(work / "ckpt", ignore_errors=True)  # the bf16 checkpoint fp8's synthetic one came from
        out = work / f"rows-{kind}.json"
        out.unlink(missing_ok=True)
        subprocess.run([sys.executable, __file__, "--part", kind, "--work_dir", str(work), "--pairs", args.pairs,
                        "--max_seconds", str(args.max_seconds), "--kv_fraction", str(args.kv_fraction),
                        *(["--num_requests", str(args.num_requests)] if args.num_requests else [])])
        shutil.rmtree(engine, ignore_errors=True)  # one engine on the disk at a time
        if out.is_file():
            rows += json.loads(out.read_text())
        else:
            print(f"{kind}: the engine run failed", flush=True)
    table(rows)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
