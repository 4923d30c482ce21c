"""`trtc serve` against the offline engine at the same concurrency, with the server's TTFT and ITL.

    python benchmarks/serve_vs_offline.py ENGINE [--concurrency 1,25,100,250,500] [--api_server_count 1,4]
        [--isl 128] [--osl 128]

For each concurrency c, max(8, waves * c) requests of ISL/OSL tokens: first `trtc bench` offline (the
Executor in a process of its own, c requests in flight; the process ends before the server starts,
so the server's pool gets the whole device), then `trtc serve ENGINE` on a loopback port loaded by
`trtc bench --url`'s streaming clients at the same c (once per --api_server_count), with the CPU
the server's processes used meanwhile.
Server overhead is 1 - server output tok/s / offline output tok/s. Prints one table; --output_json
keeps every figure. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx2 as httpx

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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_processes(pid: int) -> tuple[list[int], int]:
    """The server's front processes (`pid` and the API servers it spawned) and its engine core."""
    kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    args = {k: Path(f"/proc/{k}/cmdline").read_text() for k in kids}
    core = next(k for k in kids if "trtc.runtime.engine_core" in args[k])
    return [pid, *(k for k in kids if "spawn_main" in args[k])], core


def engine_steps(url: str) -> tuple[float, float]:
    """trtc:engine_steps_total and trtc:engine_graph_steps_total of the server."""
    values = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        name = line.split("{")[0]
        if name in ("trtc:engine_steps_total", "trtc:engine_graph_steps_total"):
            values[name] = float(line.rsplit(" ", 1)[1])
    return values["trtc:engine_steps_total"], values["trtc:engine_graph_steps_total"]


def serve_levels(args, engine: str, count: int, levels: list[int], n: dict[int, int]) -> dict[int, dict]:
    """`trtc serve --api_server_count count` loaded at each concurrency; adds the fronts' and the core's
    CPU use (in cores) during each level."""
    proc, url = start_server(engine, None, "--kv_cache_free_gpu_memory_fraction", str(args.kv_fraction),
                             "--api_server_count", str(count))
    served = {}
    try:
        run_serve_bench(url, None, args.isl, min(args.osl, 8), 4, 4, None)  # warm-up
        fronts, core = server_processes(proc.pid)
        for c in levels:
            before, steps = [cpu_seconds(p) for p in (*fronts, core)], engine_steps(url)
            r = run_serve_bench(url, None, args.isl, args.osl, n[c], c, None).to_dict()
            used = [cpu_seconds(p) - b for p, b in zip((*fronts, core), before)]
            after = engine_steps(url)
            served[c] = {**r, "front_cpu": sum(used[:-1]) / r["seconds"], "core_cpu": used[-1] / r["seconds"],
                         "steps": after[0] - steps[0], "graph_steps": after[1] - steps[1]}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    return served


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine")
    ap.add_argument("--concurrency", default="1,25,100,250,500")
    ap.add_argument("--api_server_count", default="1", help="one server run per count, e.g. 1,4")
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=128)
    ap.add_argument("--waves", type=int, default=2,
                    help="requests per level = waves x concurrency; more waves measure the steady state, fewer the ramp")
    ap.add_argument("--kv_fraction", type=float, default=0.7, help="free GPU memory fraction of the KV pool, both runs")
    ap.add_argument("--output_json", type=Path, default=None)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    counts = [int(c) for c in args.api_server_count.split(",")]
    n = {c: max(8, args.waves * c) for c in levels}

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:  # CUDA: spawn, not fork
        offline = pool.submit(offline_bench, args.engine, args.kv_fraction, args.isl, args.osl, n).result()
    served = {}
    for k in counts:
        served[k] = serve_levels(args, args.engine, k, levels, n)
        if args.output_json:  # after each run: a later one that is cut short keeps these
            args.output_json.write_text(json.dumps({"offline": offline, "served": served}, indent=2))
    print(f"\nISL/OSL {args.isl}/{args.osl}; output tok/s; server TTFT / ITL / E2E in ms (mean, p99); "
          "CPU: cores busy in the API servers / the engine core; graphs: steps replayed from CUDA graphs, offline / server; "
          "batch: output tokens per engine step, offline / server")
    print(f"{'api':>3} {'conc':>5} {'reqs':>5} {'offline':>9} {'server':>9} {'overhead':>8} {'errors':>6} "
          f"{'TTFT mean':>9} {'p99':>8} {'ITL mean':>8} {'p99':>7} {'E2E mean':>9} {'offl TTFT':>9} {'CPU':>9} {'graphs':>9}")
    def share(r: dict) -> str:
        return f"{100 * r['graph_steps'] / r['steps']:.0f}%" if r.get("steps") else "-"

    def batch(r: dict, c: int) -> str:
        return f"{n[c] * args.osl / r['steps']:.0f}" if r.get("steps") else "-"

    for k in counts:
        for c in levels:
            o, s = offline[c], served[k][c]
            print(f"{k:>3} {c:>5} {n[c]:>5} {o['output_tokens_per_s']:>9,.0f} {s['output_tokens_per_s']:>9,.0f} "
                  f"{1 - s['output_tokens_per_s'] / o['output_tokens_per_s']:>8.1%} {s['errors']:>6} "
                  f"{s['ttft_ms']['mean']:>9.1f} {s['ttft_ms']['p99']:>8.1f} {s['itl_ms']['mean']:>8.2f} "
                  f"{s['itl_ms']['p99']:>7.2f} {s['e2e_ms']['mean']:>9.0f} {o['ttft_ms']['mean']:>9.1f} "
                  f"{s['front_cpu']:>4.2f}/{s['core_cpu']:.2f} {share(o):>4}/{share(s)} {batch(o, c):>4}/{batch(s, c)}")


if __name__ == "__main__":
    main()
