"""Scheduler step cost: the C++ core (trtc._core) against its pure-Python twin doing the same bookkeeping.

    python benchmarks/scheduler_step.py [--decodes 256] [--prefills 8] [--prompt_len 512] [--steps 300]

One step is schedule() + update(). Steady state: --decodes requests decode every step, and --prefills new
requests of --prompt_len distinct random tokens arrive every step, are prefilled in that step (token budget
--max_num_tokens) and finish on their first token, so the mix stays the same and their full blocks go through
the prefix cache. Timed: schedule() + update() only (arrivals are not part of the step). Median over --steps
steps after --warmup steps; both implementations run the identical workload and must end in identical state.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from trtc import _core

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the Python twin is a test oracle
from oracles import py_scheduler  # noqa: E402


def run(make, args, num_prefills: int) -> tuple[list[float], dict]:
    rng = np.random.default_rng(0)
    s = make(num_blocks=args.num_blocks, tokens_per_block=args.tokens_per_block,
             max_batch_size=args.decodes + num_prefills, max_num_tokens=args.max_num_tokens,
             max_seq_len=args.max_seq_len)
    for rid in range(args.decodes):
        s.add_request(rid, rng.integers(1, 32000, args.prompt_len).tolist(), max_new_tokens=args.max_seq_len)
    while True:  # bring every decoder past its prefill (untimed)
        b = s.schedule()
        s.update(np.ones(int(b.sample.sum()), dtype=np.int64))
        if b.num_prefill_tokens == 0:
            break
    next_id, times = args.decodes, []
    for step in range(args.warmup + args.steps):
        for _ in range(num_prefills):
            s.add_request(next_id, rng.integers(1, 32000, args.prompt_len).tolist(), max_new_tokens=1)
            next_id += 1
        start = time.perf_counter()
        b = s.schedule()
        s.update(np.ones(int(b.sample.sum()), dtype=np.int64))
        elapsed = time.perf_counter() - start
        assert len(b) == args.decodes + num_prefills, "the workload no longer fits one step: check the sizes"
        if step >= args.warmup:
            times.append(elapsed * 1e6)
    return times, s.stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decodes", type=int, default=256)
    ap.add_argument("--prefills", type=int, default=8)
    ap.add_argument("--prompt_len", type=int, default=512)
    ap.add_argument("--tokens_per_block", type=int, default=32)
    ap.add_argument("--max_num_tokens", type=int, default=8192)
    ap.add_argument("--max_seq_len", type=int, default=4096)
    ap.add_argument("--num_blocks", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args()

    print(f"{args.decodes} decodes + P prefills of {args.prompt_len} tokens per step; tokens_per_block "
          f"{args.tokens_per_block}, max_num_tokens {args.max_num_tokens}; median of {args.steps} steps")
    print(f"{'workload':<28}{'C++ us/step':>14}{'Python us/step':>16}{'speedup':>10}")
    for num_prefills in (0, args.prefills):
        (cpp, cpp_stats), (py, py_stats) = run(_core.Scheduler, args, num_prefills), \
            run(py_scheduler.Scheduler, args, num_prefills)
        assert cpp_stats == py_stats, (cpp_stats, py_stats)
        c, p = statistics.median(cpp), statistics.median(py)
        name = f"{args.decodes} decode + {num_prefills} prefill"
        print(f"{name:<28}{c:>14.1f}{p:>16.1f}{p / c:>9.1f}x")


if __name__ == "__main__":
    main()
