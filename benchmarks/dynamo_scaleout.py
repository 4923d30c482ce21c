"""trtc behind NVIDIA Dynamo against one `trtc serve`: throughput, TTFT and prefix-cache hits.

    python benchmarks/dynamo_scaleout.py [MODEL] [--device cpu] [--isl 128] [--osl 64] [--num_requests 96]
        [--concurrency 16] [--output_json FILE]

MODEL is an HF directory (default: the books-16M fixture) or an engine directory. Builds its engine once,
then loads, with the same requests (`trtc bench --url`'s streaming clients, ISL/OSL random token ids,
ignore_eos):
1. `trtc serve ENGINE` on a loopback port;
2. a Dynamo frontend (`python -m dynamo.frontend`, file discovery) over one trtc worker, then over two.
Then a prefix workload through a frontend over two workers, once with `--router-mode kv` and once with
`round-robin`: 8 system prompts of --prefix_len tokens, each request one of them (in random order) plus
--suffix_len tokens of its own; each worker's KV cache holds --kv_cache_max_tokens tokens, fewer than
the 8 prompts take, so only a router that keeps each prompt on one worker keeps them cached. Every
engine runs one thread (OMP_NUM_THREADS=1): one worker is one core. The hit
rate is the workers' trtc:prefix_cache_hits over trtc:prefix_cache_queries (prompt tokens) meanwhile.
Prints one table; --output_json keeps every figure. Not a test: the numbers depend on the machine (say
how many cores: the workers, the frontend and the clients share them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # the Dynamo process wrappers of the scale-out tests

try:
    import dynamo.common.backend  # noqa: F401
except ImportError:
    raise SystemExit("NVIDIA Dynamo is not installed: run `bash scripts/install_dynamo.sh`") from None

from dynamo_helpers import MODEL, Cluster  # noqa: E402
from serve import start_server  # noqa: E402

from trtc.llm import resolve_engine_dir  # noqa: E402
from trtc.tools.serve_bench import run_serve_bench  # noqa: E402

FIXTURE = ROOT.parent / "shared" / "fixtures" / "books-16M"
PREFIX_METRICS = ("trtc:prefix_cache_hits_total", "trtc:prefix_cache_queries_total")


def row(name: str, r: dict) -> dict:
    return {"setup": name, "output_tok_s": r["output_tokens_per_s"], "ttft_mean_ms": r["ttft_ms"]["mean"],
            "ttft_p99_ms": r["ttft_ms"]["p99"], "itl_mean_ms": r["itl_ms"]["mean"], "errors": r["errors"],
            "seconds": r["seconds"]}


def load(url: str, model: str | None, a) -> dict:
    run_serve_bench(url, model, a.isl, 4, 4, 4, None, processes=1)  # warm-up
    return run_serve_bench(url, model, a.isl, a.osl, a.num_requests, a.concurrency, None, processes=1).to_dict()


def through_dynamo(engine: Path, workers: int, a, work: Path, worker_flags: tuple[str, ...] = (),
                   frontend_flags: tuple[str, ...] = ()) -> tuple[Cluster, str]:
    """A frontend over `workers` trtc workers of `engine`, found through file discovery."""
    c = Cluster(Path(tempfile.mkdtemp(dir=work)), engine)
    for k in range(workers):
        c.worker(f"w{k}", "--device", a.device, *worker_flags)
    url = c.frontend(*frontend_flags)
    c.wait_ready(url, workers)
    return c, url


async def prefix_requests(url: str, prompts: list[list[int]], concurrency: int) -> int:
    """Non-streaming completions of `prompts` (max_tokens 4), `concurrency` at a time; returns the errors."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(p: list[int]) -> bool:
            async with gate:
                r = await client.post(url + "/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 4,
                                                                      "temperature": 0, "ignore_eos": True})
                return r.status_code == 200
        ok = await asyncio.gather(*(one(p) for p in prompts))
    return ok.count(False)


def prefix_hit_rate(engine: Path, router: str, a, work: Path) -> dict:
    rng = random.Random(0)
    systems = [[rng.randrange(3, 500) for _ in range(a.prefix_len)] for _ in range(8)]
    prompts = [systems[rng.randrange(8)] + [rng.randrange(3, 500) for _ in range(a.suffix_len)]
               for _ in range(a.prefix_requests)]
    c, url = through_dynamo(engine, 2, a, work, ("--kv-cache-max-tokens", str(a.kv_cache_max_tokens)),
                            ("--router-mode", router))
    try:
        before = {m: sum(c.metric(w, m) for w in c.workers) for m in PREFIX_METRICS}
        served = {w: c.served(w) for w in c.workers}
        start = time.perf_counter()
        errors = asyncio.run(prefix_requests(url, prompts, a.prefix_concurrency))
        seconds = time.perf_counter() - start
        delta = {m: sum(c.metric(w, m) for w in c.workers) - before[m] for m in PREFIX_METRICS}
        per_worker = {w: c.served(w) - served[w] for w in c.workers}
    finally:
        c.stop()
    hits, queries = delta[PREFIX_METRICS[0]], delta[PREFIX_METRICS[1]]
    return {"router": router, "requests": len(prompts), "errors": errors, "seconds": seconds,
            "hit_rate": hits / queries if queries else 0.0, "prompt_tokens": queries,
            "best_hit_rate": 1 - (8 * a.prefix_len + len(prompts) * a.suffix_len) / (len(prompts) * len(prompts[0])),
            "served_per_worker": per_worker}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, default=FIXTURE)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--num_requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prefix_len", type=int, default=256, help="tokens of each of the 8 system prompts")
    ap.add_argument("--suffix_len", type=int, default=32)
    ap.add_argument("--prefix_requests", type=int, default=128)
    ap.add_argument("--prefix_concurrency", type=int, default=8)
    ap.add_argument("--kv_cache_max_tokens", type=int, default=2048, help="per worker, in the prefix workload")
    ap.add_argument("--output_json", type=Path, default=None)
    a = ap.parse_args()
    if not a.model.exists():
        raise SystemExit(f"{a.model} does not exist: pass an HF or engine directory")
    os.environ["OMP_NUM_THREADS"] = "1"  # the server's engine core as a worker's (Cluster sets it there)
    work = Path(tempfile.mkdtemp(prefix="trtc-dynamo-bench-"))
    engine = resolve_engine_dir(a.model)
    rows = []

    proc, url = start_server(str(engine), a.device)
    try:
        rows.append(row("trtc serve", load(url, None, a)))
    finally:
        proc.terminate()
        proc.wait(60)
    for workers in (1, 2):
        c, url = through_dynamo(engine, workers, a, work)
        try:
            rows.append(row(f"Dynamo, {workers} worker{'s' if workers > 1 else ''}", load(url, MODEL, a)))
        finally:
            c.stop()
    prefix = [prefix_hit_rate(engine, router, a, work) for router in ("kv", "round-robin")]

    print(f"\n{os.cpu_count()} CPU cores; {a.num_requests} requests, ISL/OSL {a.isl}/{a.osl}, concurrency {a.concurrency}")
    print(f"{'setup':<20} {'output tok/s':>12} {'vs serve':>8} {'TTFT mean':>9} {'p99':>8} {'ITL mean':>8} {'errors':>6}")
    for r in rows:
        print(f"{r['setup']:<20} {r['output_tok_s']:>12,.1f} {r['output_tok_s'] / rows[0]['output_tok_s']:>7.2f}x "
              f"{r['ttft_mean_ms']:>9.1f} {r['ttft_p99_ms']:>8.1f} {r['itl_mean_ms']:>8.2f} {r['errors']:>6}")
    print(f"\nprefix workload: 8 system prompts of {a.prefix_len} tokens + {a.suffix_len} of each request's own, "
          f"{a.prefix_requests} requests, concurrency {a.prefix_concurrency}, 2 workers of {a.kv_cache_max_tokens} "
          f"KV tokens each (best possible hit rate {prefix[0]['best_hit_rate']:.1%})")
    print(f"{'router':<12} {'hit rate':>8} {'requests per worker':>20} {'seconds':>8} {'errors':>6}")
    for p in prefix:
        print(f"{p['router']:<12} {p['hit_rate']:>8.1%} {'/'.join(f'{v:.0f}' for v in p['served_per_worker'].values()):>20} "
              f"{p['seconds']:>8.1f} {p['errors']:>6}")
    if a.output_json:
        a.output_json.write_text(json.dumps({"serving": rows, "prefix": prefix, "cpu_count": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
