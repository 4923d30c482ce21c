"""Timing GPU work as it runs in the decode graph: calls back to back, replayed from one CUDA graph,
each call reading its own copy of the data so that none of it comes from L2 (`copies_past_l2`)."""

from __future__ import annotations

import math
import statistics

import torch


def timed(calls, reps: int = 10, graph: bool = True, eager_fallback: bool = True) -> tuple[float, str]:
    """Median microseconds per call over `reps` replays of all `calls` (zero-argument callables),
    and how they ran ("graph" or "eager"). A capture that fails runs eagerly, or raises without
    eager_fallback."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    run, how = None, "eager"
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for c in calls:
                    c()
            g.replay()
            torch.cuda.synchronize()
            run, how = g.replay, "graph"
        except Exception as e:  # noqa: BLE001 - a peer that cannot be captured is timed eagerly
            torch.cuda.synchronize()
            if not eager_fallback:
                raise
            print(f"  (capture failed, eager: {type(e).__name__}: {str(e)[:80]})")
    if run is None:
        def run():
            for c in calls:
                c()
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times), how


def copies_past_l2(bytes_per_set: float, cap: int = 32) -> int:
    """How many copies of a data set of that size together span four times the L2 cache (at most cap)."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(1, min(cap, math.ceil(4 * l2 / max(bytes_per_set, 1))))
