"""`trtc serve` against the offline engine at the same concurrency, with the server's TTFT and ITL.

    python benchmarks/serve_vs_offline.py ENGINE [--concurrency 1,25,100,250,500] [--isl 128] [--osl 128]

For each concurrency c, max(8, 2c) requests of ISL/OSL tokens: first `trtc bench` offline (the
Executor in a process of its own, c requests in flight; the process ends before the server starts,
so the server's pool gets the whole device), then `trtc serve ENGINE` on a loopback port loaded by
`trtc bench --url`'s streaming clients at the same c.
Server overhead is 1 - server output tok/s / offline output tok/s. Prints one table; --output_json
keeps every figure. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import start_server  # noqa: E402

from trtc.runtime.executor import Executor  # noqa: E402
from trtc.tools.bench import bench  # noqa: E402
from trtc.tools.serve_bench import run_serve_bench  # noqa: E402


def offline_bench(engine: str, kv_fraction: float, isl: int, osl: int, n: dict[int, int]) -> dict[int, dict]:
    """`trtc bench` of the engine at each concurrency (run in a process of its own)."""
    ex = Executor(engine, free_gpu_memory_fraction=kv_fraction)
    try:
        return {c: bench(ex, isl, osl, k, concurrency=c).to_dict() for c, k in n.items()}
    finally:
        ex.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine")
    ap.add_argument("--concurrency", default="1,25,100,250,500")
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=128)
    ap.add_argument("--kv_fraction", type=float, default=0.7, help="free GPU memory fraction of the KV pool, both runs")
    ap.add_argument("--output_json", type=Path, default=None)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    n = {c: max(8, 2 * c) for c in levels}

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:  # CUDA: spawn, not fork
        offline = pool.submit(offline_bench, args.engine, args.kv_fraction, args.isl, args.osl, n).result()

    proc, url = start_server(args.engine, None, "--kv_cache_free_gpu_memory_fraction", str(args.kv_fraction))
    try:
        asyncio.run(run_serve_bench(url, None, args.isl, min(args.osl, 8), 4, 4, None))  # warm-up
        served = {c: asyncio.run(run_serve_bench(url, None, args.isl, args.osl, n[c], c, None)).to_dict()
                  for c in levels}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)

    if args.output_json:
        args.output_json.write_text(json.dumps({"offline": offline, "served": served}, indent=2))
    print(f"\nISL/OSL {args.isl}/{args.osl}; output tok/s; server TTFT / ITL / E2E in ms (mean, p99)")
    print(f"{'conc':>5} {'reqs':>5} {'offline':>9} {'server':>9} {'overhead':>8} {'errors':>6} "
          f"{'TTFT mean':>9} {'p99':>8} {'ITL mean':>8} {'p99':>7} {'E2E mean':>9} {'offl TTFT':>9}")
    for c in levels:
        o, s = offline[c], served[c]
        print(f"{c:>5} {n[c]:>5} {o['output_tokens_per_s']:>9,.0f} {s['output_tokens_per_s']:>9,.0f} "
              f"{1 - s['output_tokens_per_s'] / o['output_tokens_per_s']:>8.1%} {s['errors']:>6} "
              f"{s['ttft_ms']['mean']:>9.1f} {s['ttft_ms']['p99']:>8.1f} {s['itl_ms']['mean']:>8.2f} "
              f"{s['itl_ms']['p99']:>7.2f} {s['e2e_ms']['mean']:>9.0f} {o['ttft_ms']['mean']:>9.1f}")


if __name__ == "__main__":
    main()
