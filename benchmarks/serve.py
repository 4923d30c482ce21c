"""Serving soak test: many concurrent streams, then many sequential requests, against `trtc serve`.

    python benchmarks/serve.py MODEL [--device cpu] [--concurrent 1000] [--sequential 10000]

Starts `trtc serve MODEL` on a free loopback port, then
1. runs --concurrent streaming requests at once (trtc bench --url's clients) and checks zero errors
   and, once they end, zero running requests and zero KV blocks in use (trtc:kv_cache_usage_perc);
2. sends --sequential requests one after another and samples the server's resident memory (VmRSS)
   after a warm-up of --warmup requests and at the end: growth over 5% is a leak.
Prints one JSON object with the figures. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trtc.tools.serve_bench import format_serve_result, run_serve_bench  # noqa: E402


def rss_mib(pid: int) -> float:
    """Resident memory of the server: the front process and its children (the engine core, its ranks)."""
    text = Path(f"/proc/{pid}/status").read_text()
    total = int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            total += rss_mib(int(child))
        except (OSError, AttributeError):
            pass  # it ended meanwhile
    return total


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.split()[-1])
    raise KeyError(name)


def start_server(model: str, device: str | None, *flags: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "trtc.cli", "serve", model, "--port", str(port), "--log_level", "warning"]
    cmd += [*(["--device", device] if device else []), *flags]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)  # keep carried packages
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": path})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start")


async def sequential(url: str, n: int, pid: int, warmup: int) -> dict:
    body = {"prompt": "Once upon a time", "max_tokens": 8}
    samples, errors = {}, 0
    async with httpx.AsyncClient(timeout=60) as client:
        for i in range(1, n + 1):
            r = await client.post(url + "/v1/completions", json=body)
            errors += r.status_code != 200
            if i == warmup or i % 1000 == 0:
                samples[i] = round(rss_mib(pid), 1)
    return {"requests": n, "errors": errors, "rss_mib_by_request": samples,
            "rss_growth_after_warmup": samples[n] / samples[warmup] - 1}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--device", default=None)
    ap.add_argument("--concurrent", type=int, default=1000)
    ap.add_argument("--isl", type=int, default=32)
    ap.add_argument("--osl", type=int, default=32)
    ap.add_argument("--sequential", type=int, default=10000)
    ap.add_argument("--warmup", type=int, default=1000)
    args = ap.parse_args()
    proc, url = start_server(args.model, args.device)
    try:
        report = {}
        if args.concurrent:
            r = run_serve_bench(url, None, args.isl, args.osl, args.concurrent, None, None)
            print(format_serve_result(r), file=sys.stderr)
            time.sleep(1.0)  # the last step's statistics
            report["concurrent"] = {"streams": args.concurrent, "errors": r.errors, "seconds": round(r.seconds, 2),
                                    "output_tokens_per_s": round(r.output_tokens_per_s, 1),
                                    "running_after": metric(url, "trtc:num_requests_running"),
                                    "kv_cache_usage_after": metric(url, "trtc:kv_cache_usage_perc")}
        if args.sequential:
            report["sequential"] = asyncio.run(sequential(url, args.sequential, proc.pid, args.warmup))
        print(json.dumps(report, indent=2))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


if __name__ == "__main__":
    main()
