"""`trtc bench`: throughput and latency of an engine on synthetic prompts (no dataset).

Throughput mode keeps up to `concurrency` requests in flight and reports output tokens/s,
requests/s, TTFT and TPOT percentiles. Latency mode runs `num_requests` requests in batches of
`batch_size` (every request of a batch has the same length, so a batch ends before the next starts) and
also reports the memory-bandwidth utilisation (MBU) of a decode step: bytes of weights and KV
cache read per step / step time / the copy bandwidth measured on the same device in the same run.

Max-throughput mode is `trtllm-bench throughput`'s method: synthetic prompts of fixed ISL/OSL, every
request submitted at once (an infinite request rate), the engine's whole max_batch_size in flight,
enough requests for a steady state, each generating exactly OSL tokens (no stop on EOS); its report
sets TensorRT-LLM's published figure for the card it runs on beside trtc's.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from tqdm import tqdm

from trtc.errors import TrtcError
from trtc.plugins.gemm.w4a16_packed import decode_unread
from trtc.runtime.executor import Executor
from trtc.runtime.kv_cache import kv_bytes_per_token
from trtc.runtime.sampling_params import SamplingParams


@dataclass
class BenchResult:
    mode: str
    isl: int
    osl: int
    num_requests: int
    concurrency: int
    seconds: float
    output_tokens_per_s: float
    requests_per_s: float
    ttft_ms: dict[str, float] = field(default_factory=dict)
    tpot_ms: dict[str, float] = field(default_factory=dict)
    mbu: float | None = None  # latency mode: fraction of the measured bandwidth
    bandwidth_gbps: float | None = None
    bytes_per_step: float | None = None
    load_seconds: float | None = None  # engine load (weights to the device, KV pool) before the run
    completed: int | None = None  # max-throughput mode: requests that generated all OSL tokens
    device_name: str | None = None
    published: dict | None = None  # max-throughput mode: TensorRT-LLM's figure for this card, where there is one
    steps: int | None = None  # engine steps of the run
    graph_steps: int | None = None  # of them, replayed from a decode CUDA graph
    acceptance_length: float | None = None  # speculation: tokens per speculating request-step (1 + accepted / drafts)

    def to_dict(self) -> dict:
        return asdict(self)


def measure_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Bytes/s of a large device copy (read + write counted)."""
    if device.type != "cuda":
        nbytes = min(nbytes, 256 << 20)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    n, start = 10, time.perf_counter()
    for _ in range(n):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * n / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values) * 1e3
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def synthetic_prompts(n: int, isl: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Random token ids away from the special tokens at the start of most vocabularies."""
    g = torch.Generator().manual_seed(seed)
    low = min(100, vocab_size // 2)
    return torch.randint(low, vocab_size, (n, isl), generator=g).tolist()


def run_requests(ex: Executor, prompts: list[list[int]], osl: int, concurrency: int,
                 progress: bool | None = False) -> tuple[float, list[float], list[float]]:
    """Keep up to `concurrency` requests in flight; returns wall seconds, TTFTs and TPOTs.
    `progress`: a bar of finished requests (None: on a terminal only)."""
    params = SamplingParams(max_tokens=osl, end_id=-1)
    submitted, first, last, count = {}, {}, {}, {}
    pending = list(range(len(prompts)))[::-1]
    start = time.perf_counter()
    in_flight = 0
    bar = tqdm(total=len(prompts), desc="bench", unit="req", disable=None if progress is None else not progress,
               leave=False)
    while pending or ex.has_unfinished():
        while pending and in_flight < concurrency:
            rid = ex.add_request(prompts[pending.pop()], params)
            submitted[rid], count[rid] = time.perf_counter(), 0
            in_flight += 1
        events = ex.step()
        now = time.perf_counter()
        for e in events:
            if e.token_id is not None:
                first.setdefault(e.request_id, now)
                last[e.request_id] = now
                count[e.request_id] += 1
            if e.finish_reason is not None:
                in_flight -= 1
                bar.update(1)
    seconds = time.perf_counter() - start
    bar.close()
    ttft = [first[r] - submitted[r] for r in first]
    tpot = [(last[r] - first[r]) / (count[r] - 1) for r in first if count[r] > 1]
    return seconds, ttft, tpot


def check_latency_batches(num_requests: int | None, batch_size: int) -> None:
    if num_requests is not None and num_requests % batch_size:
        raise TrtcError(f"--num_requests {num_requests} is not a whole number of batches of --batch_size "
                        f"{batch_size}; pass a multiple of it")


def bench(
    ex: Executor, isl: int = 128, osl: int = 128, num_requests: int | None = None, concurrency: int | None = None,
    latency: bool = False, batch_size: int = 1, warmup: int = 2, progress: bool | None = False,
) -> BenchResult:
    """num_requests: 1000 in throughput mode, one batch in latency mode; concurrency: the engine's
    max_batch_size, never more than num_requests (latency mode: batch_size)."""
    vocab = ex.engine.graph.vocab_size
    if latency:
        num_requests = num_requests or batch_size
        check_latency_batches(num_requests, batch_size)
        concurrency = batch_size
    num_requests = num_requests or 1000
    concurrency = min(concurrency or ex.engine.build_config.max_batch_size, num_requests)
    run_requests(ex, synthetic_prompts(min(warmup, num_requests), isl, vocab, seed=1), min(osl, 8), concurrency)
    steps0, graphs0 = ex.step_counts()
    spec0 = replace(ex.spec_stats)
    seconds, ttft, tpot = run_requests(ex, synthetic_prompts(num_requests, isl, vocab), osl, concurrency, progress)
    steps1, graphs1 = ex.step_counts()
    spec = ex.spec_stats
    result = BenchResult(
        mode="latency" if latency else "throughput", isl=isl, osl=osl, num_requests=num_requests,
        concurrency=concurrency, seconds=seconds, output_tokens_per_s=num_requests * osl / seconds,
        requests_per_s=num_requests / seconds, ttft_ms=percentiles(ttft), tpot_ms=percentiles(tpot),
        steps=steps1 - steps0, graph_steps=graphs1 - graphs0,
    )
    if ex.speculative is not None:
        drafts = spec.num_drafts - spec0.num_drafts
        result.acceptance_length = 1 + (spec.num_accepted_tokens - spec0.num_accepted_tokens) / drafts if drafts else 1.0
    if latency and tpot:
        unread = {"embedding.weight", *decode_unread(ex.runner.w)}  # one row of the table; INT4 layers' packed copy alone
        weights = sum(t.numel() * t.element_size() * read_fraction(ex.engine.graph, name, batch_size)
                      for name, t in ex.runner.w.items() if name not in unread)
        if ex.engine.graph.tie_word_embeddings:  # the LM head reads the whole table
            weights += ex.runner.w["embedding.weight"].numel() * ex.runner.w["embedding.weight"].element_size()
        mean_context = isl + osl / 2
        result.bytes_per_step = weights + batch_size * mean_context * kv_bytes_per_token(ex.engine)
        bandwidth = measure_bandwidth(ex.device)
        result.bandwidth_gbps = bandwidth / 1e9
        result.mbu = result.bytes_per_step / (result.tpot_ms["mean"] / 1e3) / bandwidth
    return result


# TensorRT-LLM's performance overview (docs/source/performance/perf-overview.md, NVIDIA/TensorRT-LLM),
# Llama 3.1 8B FP8, TP1, max-throughput output tokens/s: (v1.0 PyTorch backend, v0.17 TensorRT engines)
PUBLISHED_SOURCE = "TensorRT-LLM perf-overview, Llama 3.1 8B FP8 TP1"
PUBLISHED = {
    "H100 SXM": {(128, 128): (28312, 28837), (128, 2048): (22714, 21109), (2048, 128): (3450, 3557),
                 (500, 2000): (17660, 16501), (1000, 1000): (15220, 15245)},
    "H200 SXM": {(128, 128): (27911, 29526), (128, 2048): (26221, 25399), (2048, 128): (3538, 3794),
                 (500, 2000): (20770, 21021), (1000, 1000): (17744, 17538)},
}
MAX_THROUGHPUT_KV_FRACTION = 0.95  # trtllm-bench's


def published_figure(device_name: str | None, isl: int, osl: int) -> dict | None:
    """TensorRT-LLM's published figure for the card named `device_name` at isl/osl, or None."""
    name = (device_name or "").upper()
    card = "H200 SXM" if "H200" in name else "H100 SXM" if "H100" in name else None
    if card is None or (isl, osl) not in PUBLISHED[card]:
        return None
    v1, v017 = PUBLISHED[card][(isl, osl)]
    return {"card": card, "source": PUBLISHED_SOURCE, "v1.0": v1, "v0.17": v017, "best": max(v1, v017)}


def steady_state_requests(max_batch_size: int) -> int:
    """Requests for a steady state: three full batches, and at least 1000."""
    return max(3 * max_batch_size, 1000)


def max_throughput(ex: Executor, isl: int = 128, osl: int = 128, num_requests: int | None = None,
                   max_seconds: float | None = None, warmup: int = 2, progress: bool | None = False) -> BenchResult:
    """Every request queued at once and run to its OSL tokens. num_requests: steady_state_requests of
    the engine's max_batch_size. max_seconds: a time budget; requests still running then are cancelled
    and the figure counts the tokens generated until then (`completed` says how many finished)."""
    bc, vocab = ex.engine.build_config, ex.engine.graph.vocab_size
    num_requests = num_requests or steady_state_requests(bc.max_batch_size)
    run_requests(ex, synthetic_prompts(min(warmup, num_requests), isl, vocab, seed=1), min(osl, 8), bc.max_batch_size)
    params = SamplingParams(max_tokens=osl, end_id=-1)
    bar = tqdm(total=num_requests, desc="max-throughput", unit="req", leave=False,
               disable=None if progress is None else not progress)
    start = time.perf_counter()
    submitted = {ex.add_request(p, params): time.perf_counter() for p in synthetic_prompts(num_requests, isl, vocab)}
    first, last, count = {}, {}, dict.fromkeys(submitted, 0)
    completed, seconds = 0, None
    while ex.has_unfinished():
        if seconds is None and max_seconds is not None and time.perf_counter() - start > max_seconds:
            seconds = time.perf_counter() - start
            for rid in submitted:
                ex.cancel(rid)
        events = ex.step()
        now = time.perf_counter()
        for e in events:
            if e.token_id is not None:
                first.setdefault(e.request_id, now)
                last[e.request_id] = now
                count[e.request_id] += 1
            if e.finish_reason is not None and count[e.request_id] == osl:
                completed += 1
                bar.update(1)
    seconds = seconds or time.perf_counter() - start
    bar.close()
    tokens = sum(count.values()) if completed < num_requests else completed * osl
    name = torch.cuda.get_device_name(ex.device) if ex.device.type == "cuda" else str(ex.device)
    return BenchResult(
        mode="max-throughput", isl=isl, osl=osl, num_requests=num_requests, concurrency=num_requests,
        seconds=seconds, output_tokens_per_s=tokens / seconds, requests_per_s=completed / seconds,
        ttft_ms=percentiles([first[r] - submitted[r] for r in first]),
        tpot_ms=percentiles([(last[r] - first[r]) / (count[r] - 1) for r in first if count[r] > 1]),
        completed=completed, device_name=name, published=published_figure(name, isl, osl),
    )


def read_fraction(graph, name: str, batch_size: int) -> float:
    """The fraction of weight `name` a decode step of `batch_size` tokens reads: 1, or for a stacked
    expert tensor (`layers.{i}.mlp.experts.*`, E experts in front) the expected share of experts
    chosen at least once when each token picks top_k of E uniformly: 1 - (1 - k / E) ** batch_size
    (exactly k / E at batch 1), the MoE byte count of a decode step."""
    if ".mlp.experts." not in name:
        return 1.0
    moe = graph.layers[int(name.split(".")[1])].mlp.moe
    return 1.0 - (1.0 - moe.top_k / moe.num_experts) ** batch_size


def format_result(r: BenchResult) -> str:
    lines = [
        f"mode {r.mode}: ISL {r.isl} / OSL {r.osl}, {r.num_requests} requests, concurrency {r.concurrency}",
        f"  output tokens/s  {r.output_tokens_per_s:,.1f}",
        f"  requests/s       {r.requests_per_s:,.2f}",
    ]
    for name, p in (("TTFT", r.ttft_ms), ("TPOT", r.tpot_ms)):
        if p:
            lines.append(f"  {name} ms         mean {p['mean']:.2f}  p50 {p['p50']:.2f}  p90 {p['p90']:.2f}  p99 {p['p99']:.2f}")
    if r.mode == "max-throughput":
        lines[0] += f" (all at once; {r.completed} completed{'' if r.completed == r.num_requests else ' in the time budget'})"
        p = r.published
        if p is None:
            lines.append(f"  published        none for {r.device_name} at {r.isl}/{r.osl}")
        else:
            lines.append(f"  published        {p['v1.0']:,} (v1.0) / {p['v0.17']:,} (v0.17) output tokens/s, {p['source']}, "
                         f"{p['card']}; trtc {r.output_tokens_per_s / p['best']:.2f}x the higher")
    if r.steps:
        lines.append(f"  steps            {r.steps:,}, {100 * r.graph_steps / r.steps:.0f}% replayed from CUDA graphs")
    if r.acceptance_length is not None:
        lines.append(f"  speculation      mean acceptance length {r.acceptance_length:.2f} tokens per drafted step")
    if r.mbu is not None:
        lines.append(f"  MBU              {100 * r.mbu:.1f}% ({r.bytes_per_step / 1e9:.3f} GB per step, "
                     f"bandwidth {r.bandwidth_gbps:,.0f} GB/s measured)")
    return "\n".join(lines)
