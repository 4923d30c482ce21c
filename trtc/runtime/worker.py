"""One rank's share of a model, and the loop of the ranks other than 0.

`Worker` is what every rank holds and does alike: its weights (the rank's engine file), a KV-cache
pool of the same number of blocks on every rank (the fewest that fit on any of them), the decode
CUDA graphs (captured on every rank at the same sizes in the same order, since collectives are
inside them), and the forward of a `Step`. Rank 0's executor owns one; every other rank runs
`serve`: receive rank 0's step, run it, until rank 0 says stop.

A rank that rank 0 started runs this module:

    python -m trtc.runtime.worker --engine_dir E --rank R --world_size N --store HOST:PORT --device cpu|cuda
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from trtc.compiler.memory_plan import MemoryPlan, memory_plan, size
from trtc.errors import TrtcError
from trtc.formats.engine import Engine
from trtc.formats.quant_layout import QuantConfig
from trtc.plugins.attention.metadata import AttentionMetadata
from trtc.runtime.cuda_graphs import DecodeCudaGraphs
from trtc.runtime.kv_cache import num_kv_blocks
from trtc.runtime.lora import token_groups
from trtc.runtime.parallel.distributed import START_TIMEOUT_S, RankGroup, error_line
from trtc.runtime.parallel.step import Step, receive_step
from trtc.runtime.profile_run import ProfiledPeaks, profile_run
from trtc.runtime.runners import Runner, make_runner

READY_KEY = "trtc/ready/{rank}"


@dataclass
class RankOptions:
    """How every rank sizes its share (rank 0's executor arguments, passed on to the others)."""

    kv_cache_max_tokens: int | None = None
    free_gpu_memory_fraction: float = 0.9
    enable_cuda_graphs: bool = True

    def to_args(self) -> list[str]:
        args = ["--free_gpu_memory_fraction", repr(self.free_gpu_memory_fraction)]
        if self.kv_cache_max_tokens is not None:
            args += ["--kv_cache_max_tokens", str(self.kv_cache_max_tokens)]
        return args + ([] if self.enable_cuda_graphs else ["--no_cuda_graphs"])


class RankStopped(Exception):
    """This rank stops; rank 0 reports why (a start-up error of some rank, or rank 0 stopped)."""


def use_expandable_segments() -> None:
    """Let PyTorch's caching allocator grow segments in place instead of caching one block per shape
    seen, so that steps of changing shapes do not fragment the memory the plan left free. A
    PYTORCH_CUDA_ALLOC_CONF of the user's, or TRTC_EXPANDABLE_SEGMENTS=0, keeps the allocator as set."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or os.environ.get("TRTC_EXPANDABLE_SEGMENTS", "1") == "0":
        return
    torch.cuda.memory._set_allocator_settings("expandable_segments:True")


class Worker:
    def __init__(self, engine: Engine | str | Path, device: torch.device, group: RankGroup | None,
                 options: RankOptions) -> None:
        rank = group.rank if group is not None else 0
        self.device, error, blocks, build, use_graphs = device, None, 0, None, False
        self.peaks, self.reserved = ProfiledPeaks(), 0
        try:
            self.engine = engine if isinstance(engine, Engine) else Engine.load(engine)
            self.engine.check_runtime(device)
            build = (self.engine.build_id, str(self.engine.directory))
            if device.type == "cuda":
                use_expandable_segments()
            self.runner: Runner = make_runner(self.engine, device, rank, group)  # weights first: the pool takes what is left
            self.plan = runtime_plan(self.engine, options.free_gpu_memory_fraction)
            if device.type == "cuda":
                self.plan.capacity = torch.cuda.mem_get_info(device)[1]  # what `--dry_run --gpu_memory` would be told
            use_graphs = options.enable_cuda_graphs and device.type == "cuda" and self.runner.graph_capturable()
            if options.kv_cache_max_tokens is None and device.type == "cuda":
                self.peaks = profile_run(self.runner, use_graphs)
                planned = self.plan.workspace - (0 if use_graphs else self.plan.graphs)
                self.reserved = max(planned, self.peaks.total)  # the plan, or the profile run where it needs more
            blocks = num_kv_blocks(self.engine, device, options.kv_cache_max_tokens, options.free_gpu_memory_fraction,
                                   self.reserved)
        except TrtcError as e:
            error = str(e)
        except torch.cuda.OutOfMemoryError as e:  # reported by rank 0 like any start-up error
            error = (f"out of memory on {device} loading engine {getattr(engine, 'directory', engine)} "
                     f"({error_line(e)}); free the GPU, "
                     "or split the model over more GPUs (a larger --tp)")
        self.num_blocks = _agree(group, error, build, blocks)
        bc = self.engine.build_config
        self.runner.allocate_kv_cache(self.num_blocks + (1 if use_graphs else 0))  # + a scratch block for padding
        self.cuda_graphs = None
        self.graph_steps = 0  # steps replayed from a decode CUDA graph (the others ran eagerly)
        if use_graphs:
            self.cuda_graphs = DecodeCudaGraphs(
                self.runner, bc.cuda_graph_batch_sizes, -(-bc.max_seq_len // bc.tokens_per_block), self.num_blocks
            )

    def memory_budget(self) -> int:
        """The most device memory PyTorch may hold for this rank from now on: the weights, the KV pool
        and what the pool was sized to leave for the steps (activations, logits, sampling, graphs)."""
        return self.runner.weight_bytes() + self.runner.kv_cache_bytes() + self.reserved

    def memory_line(self) -> str:
        """The plan's figures (those `trtc build --dry_run` prints), then what the profile run measured."""
        line = f"memory plan: {self.plan.workspace_line()}"
        if self.peaks.total:
            captured = f", captured {size(self.cuda_graphs.memory_bytes)}" if self.cuda_graphs is not None else ""
            line += (f"; profile run: step {size(self.peaks.step)}, sampling {size(self.peaks.sampling)}, graphs "
                     f"{size(self.peaks.graphs)}{captured}; reserved {size(self.reserved)}")
        line += f"; KV pool {size(self.runner.kv_cache_bytes())}"
        if self.device.type == "cuda" and self.plan.capacity is not None:
            line += f" (the plan's for {size(self.plan.capacity)} of GPU memory: {size(self.plan.kv_pool())})"
        return line

    def execute(self, step: Step, on_logits: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor | None:
        """Logits [S, vocab] f32 of the step's logits rows: replayed from a decode CUDA graph where
        one fits the step, else run eagerly. With `on_logits`, the rows go to it in chunks as they
        are computed instead (ModelRunner.forward) and None is returned."""
        if step.lora_slots is not None:  # adapters run eagerly (the graphs hold none)
            self.runner.lora_step = token_groups(step.lora_slots, step.query_lens, self.device)
            try:
                return self._eager(step, on_logits)
            finally:
                self.runner.lora_step = None
        if self.cuda_graphs is not None and self.cuda_graphs.can_run(step):
            logits = self.cuda_graphs.run(step)
            self.graph_steps += 1
            if on_logits is None:
                return logits
            on_logits(0, logits)
            return None
        return self._eager(step, on_logits)

    def _eager(self, step: Step, on_logits: Callable[[int, torch.Tensor], None] | None) -> torch.Tensor | None:
        input_ids = torch.from_numpy(np.asarray(step.input_ids, dtype=np.int64)).to(self.device)
        meta = AttentionMetadata.from_step(step, self.device)
        index = torch.from_numpy(np.asarray(step.logits_indices, dtype=np.int64)).to(self.device)
        if on_logits is None:
            return self.runner.forward(input_ids, meta, index)
        return self.runner.forward(input_ids, meta, index, on_logits)

    def close(self) -> None:
        """Give the device memory back now (CUDA graphs, KV cache, weights, workspaces); the worker keeps no
        reference to any of them."""
        if self.cuda_graphs is not None:
            self.cuda_graphs.release()
            self.cuda_graphs = None
        if self.runner is not None:
            self.runner.release()
            self.runner = None


def runtime_plan(engine: Engine, free_gpu_memory_fraction: float) -> MemoryPlan:
    """The engine's memory plan, as `trtc build --dry_run` computes it (the same figures)."""
    p = engine.pretrained
    return memory_plan(engine.graph, engine.mapping, p.dtype, QuantConfig.from_dict(p.quantization), engine.build_config,
                       free_gpu_memory_fraction=free_gpu_memory_fraction)


def _agree(group: RankGroup | None, error: str | None, build: tuple | None, blocks: int) -> int:
    """Every rank's start-up outcome, on every rank: the first error ends all of them (rank 0
    raises it, the others stop); the ranks must run one build; the pool is the smallest one."""
    if group is None:
        if error is not None:
            raise TrtcError(error)
        return blocks
    results = group.exchange((error, build, blocks))
    for r, (err, _, _) in enumerate(results):
        if err is not None:
            if group.rank != 0:
                raise RankStopped(err)
            raise TrtcError(err if r == 0 else f"rank {r}: {err}")
    ours, directory = results[0][1]
    for r, (_, (theirs, their_dir), _) in enumerate(results):
        if theirs != ours:
            if group.rank != 0:
                raise RankStopped("another build")
            raise TrtcError(
                f"rank {r} runs build {theirs} ({their_dir}) but rank 0 runs build {ours} ({directory}); "
                "give every rank the same engine directory"
            )
    return min(b for _, _, b in results)


def _drop_logits(start: int, logits: torch.Tensor) -> None:
    """A rank other than 0 computes the logits chunks alongside rank 0 (their gathers) and drops them."""


def serve(worker: Worker, group: RankGroup) -> None:
    """A rank other than 0: run rank 0's steps until it sends stop."""
    while (step := receive_step(group)) is not None:
        worker.execute(step, _drop_logits)  # its logits are rank 0's to sample and score
        if worker.device.type == "cuda":  # the graphs' pinned inputs are rewritten by the next step
            torch.cuda.current_stream().synchronize()


def run_rank(engine: Engine | str | Path, device: torch.device, group: RankGroup, options: RankOptions) -> int:
    """A rank other than 0, from its start-up to rank 0's stop; returns the process's exit code.
    Errors are rank 0's to report: this rank prints one line at most."""
    try:
        worker = Worker(engine, device, group, options)
        serve(worker, group)
        worker.close()  # NCCL's orderly destroy hangs while CUDA graphs holding its collectives are alive
    except RankStopped:
        group.close(abort=True)
        return 1
    except (TrtcError, RuntimeError) as e:  # a lost rank 0, a failed collective
        print(f"[trtc rank {group.rank}] stopped: {error_line(e)}", file=sys.stderr)
        group.close(abort=True)
        return 1
    group.close()
    return 0


def _exit_with_parent(parent: int) -> None:
    """End this rank when rank 0, its parent, is gone, even while it waits inside a collective
    that will not return (NCCL waits on the GPU)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trtc.runtime.worker", description="A tensor-parallel rank that rank 0 started.")
    ap.add_argument("--engine_dir", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world_size", type=int, required=True)
    ap.add_argument("--store", required=True, help="HOST:PORT of rank 0's TCPStore")
    ap.add_argument("--device", choices=["cpu", "cuda"], required=True)
    ap.add_argument("--kv_cache_max_tokens", type=int, default=None)
    ap.add_argument("--free_gpu_memory_fraction", type=float, default=0.9)
    ap.add_argument("--no_cuda_graphs", action="store_true")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to rank 0, which stops this rank
    logging.basicConfig(level=logging.WARNING, format=f"[trtc rank {args.rank}] %(message)s")
    if args.device == "cpu":  # the ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))  # as ranks.cpu_share
    device = torch.device("cuda", args.rank) if args.device == "cuda" else torch.device("cpu")
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    options = RankOptions(args.kv_cache_max_tokens, args.free_gpu_memory_fraction, not args.no_cuda_graphs)
    try:
        import torch.distributed as dist

        host, port = args.store.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), args.world_size, is_master=False,
                              timeout=timedelta(seconds=START_TIMEOUT_S))
        store.set(READY_KEY.format(rank=args.rank), "1")
        group = RankGroup.join(args.rank, args.world_size, device, store)
    except (TrtcError, RuntimeError) as e:
        print(f"[trtc rank {args.rank}] could not start: {error_line(e)}", file=sys.stderr)
        return 1
    return run_rank(args.engine_dir, device, group, options)


if __name__ == "__main__":
    sys.exit(main())

