"""`trtc bench --url`: load a running OpenAI-compatible server (trtc serve, vLLM, trtllm-serve) with
asyncio streaming clients, at a fixed concurrency or with Poisson arrivals at a request rate, spread
over client processes so that reading thousands of chunks a second never caps what is measured.

Reports what TensorRT-LLM's and vLLM's `benchmark_serving` report: request throughput, output
tokens/s, and TTFT / TPOT / ITL / E2E latency mean, median and p99 (milliseconds). Prompts are
random token ids (`ISL` of them, or lengths drawn uniformly in [ISL*(1-r), ISL*(1+r)] with
--range_ratio r), sent with `ignore_eos` so every request produces exactly its OSL tokens.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import os
import random
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from queue import Empty

import httpx2 as httpx
import numpy as np


@dataclass
class RequestResult:
    ok: bool
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class ServeBenchResult:
    url: str
    num_requests: int
    concurrency: int | None
    request_rate: float | None
    seconds: float
    completed: int
    errors: int
    requests_per_s: float
    output_tokens_per_s: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    first_errors: list[str]
    client_processes: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    a = np.asarray(values) * 1000
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p99": float(np.percentile(a, 99))}


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], osl: int,
               headers: dict) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": osl, "stream": True, "ignore_eos": True,
            "temperature": 0, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last, result = start, RequestResult(ok=False)
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                return RequestResult(ok=False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):  # one chunk per step's new tokens, whatever text they decode to
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
    except (httpx.HTTPError, OSError, ValueError) as e:
        return RequestResult(ok=False, error=f"{type(e).__name__}: {e}")
    result.e2e = time.perf_counter() - start
    result.ok = result.output_tokens == osl
    if not result.ok:
        result.error = f"{result.output_tokens} output tokens, expected {osl}"
    return result


START_S = 120.0  # client processes not all started by then: the run fails
STREAMS_PER_CLIENT = 64  # streams one client process reads at full speed (a Python SSE reader is ~60 us a chunk)


def client_processes(concurrency: int | None, num_requests: int) -> int:
    """How many client processes load the server: enough that reading the streams never caps what is
    measured (one per STREAMS_PER_CLIENT streams in flight), at most one per CPU core."""
    in_flight = min(concurrency or num_requests, num_requests)
    return max(1, min(os.cpu_count() or 1, math.ceil(in_flight / STREAMS_PER_CLIENT)))


async def _client(url: str, model: str, prompts: list[list[int]], osl: int, concurrency: int | None,
                  request_rate: float | None, headers: dict, seed: int, timeout_s: float) -> list[RequestResult]:
    """One process's share: its prompts at its concurrency (or Poisson arrivals at its rate)."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=(concurrency or len(prompts)) + 8, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency) if concurrency else None

        async def limited(prompt):
            if gate is None:
                return await _one(client, url, model, prompt, osl, headers)
            async with gate:
                return await _one(client, url, model, prompt, osl, headers)

        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.ensure_future(limited(prompt)))
            if request_rate:
                await asyncio.sleep(rng.expovariate(request_rate))  # Poisson arrivals
        return list(await asyncio.gather(*tasks))


def _client_process(start: Barrier, results: Queue, *args) -> None:
    start.wait(START_S)  # every process is loaded: they begin together (BrokenBarrierError: one never came)
    t0 = time.perf_counter()  # CLOCK_MONOTONIC: one clock for every process of the machine
    out = asyncio.run(_client(*args))
    results.put((out, t0, time.perf_counter()))


def run_serve_bench(url: str, model: str | None, isl: int, osl: int, num_requests: int,
                    concurrency: int | None, request_rate: float | None, range_ratio: float = 0.0,
                    max_token_id: int = 500, api_key: str | None = None, seed: int = 0,
                    timeout_s: float = 600, processes: int | None = None) -> ServeBenchResult:
    """Load `url` with `num_requests` streaming requests; `processes` client processes share them (the
    requests round-robin, the concurrency and the rate split evenly; default client_processes())."""
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if model is None:
        r = httpx.get(url + "/v1/models", headers=headers, timeout=timeout_s)
        r.raise_for_status()
        model = r.json()["data"][0]["id"]
    lengths = [max(1, round(isl * rng.uniform(1 - range_ratio, 1 + range_ratio))) for _ in range(num_requests)]
    prompts = [[rng.randrange(3, max_token_id) for _ in range(n)] for n in lengths]
    k = max(1, min(processes or client_processes(concurrency, num_requests), num_requests, concurrency or num_requests))
    shares = [(url, model, prompts[i::k], osl, None if concurrency is None else concurrency // k + (i < concurrency % k),
               None if request_rate is None else request_rate / k, headers, seed + i, timeout_s) for i in range(k)]
    if k == 1:
        start = time.perf_counter()
        results = asyncio.run(_client(*shares[0]))
        seconds = time.perf_counter() - start
    else:
        ctx = multiprocessing.get_context("spawn")
        barrier, queue = ctx.Barrier(k), ctx.Queue()
        procs = [ctx.Process(target=_client_process, args=(barrier, queue, *share), daemon=True) for share in shares]
        for p in procs:
            p.start()
        parts = []
        while len(parts) < k:  # before join: a child exits only once its results are read
            try:
                parts.append(queue.get(timeout=1.0))
            except Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if (dead or not any(p.is_alive() for p in procs)) and queue.empty():
                    barrier.abort()
                    for p in procs:
                        p.terminate()
                    raise RuntimeError(f"a client process exited with status {dead[0].exitcode if dead else 0} before "
                                       "giving its results; see its error above") from None
        for p in procs:
            p.join()
        results = [r for part in parts for r in part[0]]
        seconds = max(p[2] for p in parts) - min(p[1] for p in parts)
    ok = [r for r in results if r.ok]
    return ServeBenchResult(
        url=url, num_requests=num_requests, concurrency=concurrency, request_rate=request_rate, seconds=seconds,
        completed=len(ok), errors=len(results) - len(ok), requests_per_s=len(ok) / seconds,
        output_tokens_per_s=sum(r.output_tokens for r in ok) / seconds,
        ttft_ms=_stats([r.ttft for r in ok]),
        tpot_ms=_stats([(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]),
        itl_ms=_stats([x for r in ok for x in r.itls]), e2e_ms=_stats([r.e2e for r in ok]),
        first_errors=[r.error for r in results if not r.ok][:5], client_processes=k,
    )


def format_serve_result(r: ServeBenchResult) -> str:
    lines = [f"{r.url}: {r.completed}/{r.num_requests} requests ok, {r.errors} errors in {r.seconds:.2f} s "
             f"(concurrency {r.concurrency or 'unbounded'}, rate {r.request_rate or 'inf'} req/s, "
             f"{r.client_processes} client process{'es' if r.client_processes > 1 else ''})",
             f"  request throughput {r.requests_per_s:.2f} req/s, output {r.output_tokens_per_s:.1f} tokens/s"]
    for name, s in (("TTFT", r.ttft_ms), ("TPOT", r.tpot_ms), ("ITL", r.itl_ms), ("E2E", r.e2e_ms)):
        lines.append(f"  {name:5s} ms: mean {s['mean']:.2f}  median {s['median']:.2f}  p99 {s['p99']:.2f}")
    lines += [f"  error: {e}" for e in r.first_errors]
    return "\n".join(lines)
