"""Sampling op: per-row penalties, temperature, top-k, top-p, min-p, then a seeded draw.

`reference` is the plain PyTorch implementation (any device); fast kernels are checked against it.
"""

from trtc.plugins.sampling.sampler import (
    SAMPLING_CHUNK_ROWS,
    SamplingBatch,
    draw_noise,
    make_generator,
    process_logits,
    sample,
    token_logprobs,
    top_logprobs,
)

__all__ = ["SAMPLING_CHUNK_ROWS", "SamplingBatch", "draw_noise", "make_generator", "process_logits", "sample",
           "token_logprobs", "top_logprobs"]
