"""The profile run at load: the worst step the engine admits, run once and measured, so that the
KV pool gets only what is left (vLLM's profile run).

The worst step is a forward of max_num_tokens prompt tokens with the logits of max_batch_size rows,
then sampling of those rows with every processor on (penalties, temperature, top-k, top-p, min-p,
seeded and unseeded draws) and their top-20 logprobs; then a capture of the decode CUDA graph of the
largest batch size (the graphs share one pool, so the largest is what they take). All of it runs
over a scratch KV pool that is freed before the real pool is sized. Each rank measures its own
memory, without collectives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trtc.plugins.sampling.sampler import SamplingBatch, make_generator, sample, top_logprobs
from trtc.runtime.cuda_graphs import DecodeCudaGraphs
from trtc.runtime.sampling_params import SamplingParams

MAX_TOP_LOGPROBS = 20


@dataclass
class ProfiledPeaks:
    """Bytes above the weights, measured on the device (0: not measured, e.g. on a CPU)."""

    step: int = 0  # the forward of the worst step, its float32 logits included
    sampling: int = 0  # sampling and top logprobs over those logits, above them
    graphs: int = 0  # the device memory the decode CUDA graphs' pool takes

    @property
    def total(self) -> int:
        return self.step + self.sampling + self.graphs


def profile_run(runner, capture_graphs: bool) -> ProfiledPeaks:
    """Run and measure the worst step on `runner` (a ModelRunner on a GPU; anything else: zeros)."""
    peaks = ProfiledPeaks()
    if runner.device.type != "cuda" or not hasattr(runner, "largest_step"):
        return peaks
    dev, group = runner.device, runner.group
    runner.group = None  # one rank's memory; the other ranks need not take part
    try:
        step = runner.largest_step()  # over a scratch pool
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        logits = runner.forward(*step)  # [max_batch_size, vocab] f32
        torch.cuda.synchronize(dev)
        peaks.step = torch.cuda.max_memory_allocated(dev) - base
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        worst_sampling(logits)
        torch.cuda.synchronize(dev)
        peaks.sampling = torch.cuda.max_memory_allocated(dev) - base
        del logits, step
        torch.cuda.empty_cache()
        if capture_graphs:
            bc = runner.build_config
            graphs = DecodeCudaGraphs(runner, [max(bc.cuda_graph_batch_sizes)], -(-bc.max_seq_len // bc.tokens_per_block), 0)
            peaks.graphs = graphs.memory_bytes
            graphs.release()
            del graphs
    finally:
        runner.group = group
        runner.k_cache, runner.v_cache = [], []
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
    return peaks


def worst_sampling(logits: torch.Tensor) -> None:
    """logits: [B, V] f32. Samples every row with every processor on (half of the rows seeded) and
    takes their top logprobs: the most the sampler holds for B rows."""
    rows, vocab = logits.shape
    params = [SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                             presence_penalty=0.1, frequency_penalty=0.1, seed=i if i % 2 else None)
              for i in range(rows)]
    batch = SamplingBatch.from_requests(params, [[1]] * rows, [[2]] * rows,
                                        [make_generator(p.seed, logits.device) for p in params], vocab, logits.device)
    sample(logits, batch)
    top_logprobs(logits, range(rows), MAX_TOP_LOGPROBS)
