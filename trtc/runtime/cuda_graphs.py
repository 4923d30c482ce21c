"""Decode steps replayed as CUDA graphs, one captured per batch size chosen at build time.

A decode-only batch of B requests is padded up to the nearest captured size: padding rows feed
token 0 at position 0, write their K/V into a scratch block outside the scheduler's pool, and
their logits are dropped. Applied from outside the model: the runner's forward is captured as is.
The graphs share one memory pool (captured largest first, so the smaller ones reuse its blocks),
one float32 logits buffer [largest size, vocab] that each writes its rows into, and one warm-up
stream (cuBLAS keeps a workspace per stream), so their memory is a decode forward of the largest size
and that buffer, whatever the number of sizes (`memory_bytes`, what the memory plan counts).
With tensor parallelism every rank captures the same sizes in the same order (the all-reduces are
inside the graphs) and replays the graph the step picks (trtc/runtime/parallel/step.py).
"""

from __future__ import annotations

import atexit
import weakref

import numpy as np
import torch

from trtc.plugins.attention.metadata import AttentionMetadata
from trtc.runtime.parallel.step import Step

_LIVE: weakref.WeakSet[DecodeCudaGraphs] = weakref.WeakSet()


@atexit.register
def _release_all() -> None:
    # Graphs destroyed during interpreter teardown, after CUDA's own shutdown began, can crash the
    # process on exit: release them while everything is still alive.
    for graphs in list(_LIVE):
        graphs.release()


class DecodeCudaGraphs:
    def __init__(self, runner, batch_sizes: list[int], max_blocks_per_seq: int, scratch_block: int) -> None:
        self.runner, self.sizes = runner, sorted(batch_sizes)
        bmax, dev = self.sizes[-1], runner.device
        self.width = max_blocks_per_seq
        self.scratch_slot = scratch_block * runner.build_config.tokens_per_block
        # Static inputs the graphs read, each filled by one asynchronous copy from a pinned host twin.
        self.ids_pos_slot = torch.zeros(3, bmax, dtype=torch.int64, device=dev)  # input_ids, positions, slots
        self.input_ids, self.positions, self.slot_mapping = self.ids_pos_slot.unbind(0)
        self.slot_mapping.fill_(self.scratch_slot)
        self.block_tables = torch.full((bmax, self.width), scratch_block, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(bmax, dtype=torch.int32, device=dev)
        self.host_ids_pos_slot = self.ids_pos_slot.cpu().pin_memory()
        self.host_block_tables = self.block_tables.cpu().pin_memory()
        self.host_context_lens = self.context_lens.cpu().pin_memory()
        self.query_start_loc = torch.arange(bmax + 1, dtype=torch.int32, device=dev)
        self.logits_indices = torch.arange(bmax, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        torch.cuda.synchronize(dev)
        free = torch.cuda.mem_get_info(dev)[0]
        self.logits = torch.empty(bmax, runner.graph.vocab_size, dtype=torch.float32, device=dev)  # [bmax, vocab]
        self._capture()
        torch.cuda.empty_cache()  # the warm-ups' cached blocks: what stays is the graphs' pool and the buffer
        self.memory_bytes = free - torch.cuda.mem_get_info(dev)[0]  # the device memory the graphs took
        _LIVE.add(self)

    def release(self) -> None:
        torch.cuda.synchronize()
        self.graphs.clear()
        self.logits = None

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            positions=self.positions[:bs], slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
            query_lens=[1] * bs, context_lens=[1] * bs, query_start_loc=self.query_start_loc[: bs + 1],
            context_lens_tensor=self.context_lens[:bs], num_decodes=bs, max_query_len=1,
        )

    def _capture(self) -> None:
        pool = None
        stream = torch.cuda.Stream()
        for bs in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            args = (self.input_ids[:bs], self._meta(bs), self.logits_indices[:bs])
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up (Triton compiles, cuBLAS picks) outside the capture
                self.runner.forward(*args, logits_out=self.logits)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.runner.forward(*args, logits_out=self.logits)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, step: Step) -> bool:
        """A decode-only step of at most the largest captured batch size that wants the logits of
        every sequence in order (what a graph computes)."""
        b = len(step.context_lens)
        return (step.decode_only and b <= self.sizes[-1] and step.block_tables.shape[1] <= self.width
                and len(step.logits_indices) == b and bool((step.logits_indices == np.arange(b)).all()))

    def run(self, step: Step) -> torch.Tensor:
        """Logits [B, vocab] f32 of a step that can_run."""
        b = len(step.context_lens)
        bs = next(s for s in self.sizes if s >= b)
        tables = np.asarray(step.block_tables, dtype=np.int32)
        ids_pos_slot, block_tables, ctx = (self.host_ids_pos_slot.numpy(), self.host_block_tables.numpy(),
                                           self.host_context_lens.numpy())
        ids_pos_slot[0, :b], ids_pos_slot[1, :b], ids_pos_slot[2, :b] = step.input_ids, step.positions, step.slot_mapping
        ids_pos_slot[:2, b:bs], ids_pos_slot[2, b:bs] = 0, self.scratch_slot  # padding rows: token 0 into the scratch slot
        block_tables[:b, : tables.shape[1]] = tables
        ctx[:b], ctx[b:bs] = step.context_lens, 1
        # The host buffers are rewritten only after the caller has read this step's tokens, so after
        # these copies are done.
        self.ids_pos_slot.copy_(self.host_ids_pos_slot, non_blocking=True)
        self.block_tables[:bs].copy_(self.host_block_tables[:bs], non_blocking=True)
        self.context_lens.copy_(self.host_context_lens, non_blocking=True)
        self.graphs[bs].replay()
        return self.logits[:b]
