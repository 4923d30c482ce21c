"""Sizing the paged KV-cache pool."""

from __future__ import annotations

import os

import torch

from trtc.errors import TrtcError
from trtc.formats.build_config import kv_cache_torch_dtype
from trtc.formats.engine import Engine

CPU_KV_CACHE_FRACTION = 0.25  # of the memory available when no GPU: leave room for everything else
CPU_KV_CACHE_TOKENS = 65536  # the CPU pool's default cap (raised to one max_seq_len sequence)


def kv_bytes_per_token(engine: Engine) -> int:
    """K and V bytes of one token over all layers, on one rank."""
    itemsize = kv_cache_torch_dtype(engine.build_config.kv_cache_dtype).itemsize
    return sum(2 * engine.mapping.local_kv_heads(l.attention) * l.attention.head_dim * itemsize for l in engine.graph.layers)


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of the GPU, or the RAM available on a CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def num_kv_blocks(
    engine: Engine,
    device: torch.device,
    max_tokens: int | None = None,
    free_gpu_memory_fraction: float = 0.9,
    activation_bytes: int = 0,
) -> int:
    """Blocks in the pool: `max_tokens` if given (--kv_cache_max_tokens; refused if it cannot fit in
    the free memory), else what fits in a share of the free memory: on a GPU, that fraction of what
    is free after the weights and `activation_bytes` (the peak a forward of max_num_tokens needs); on
    a CPU, a quarter of the available RAM and at most CPU_KV_CACHE_TOKENS tokens (or one max_seq_len
    sequence if longer). Never more than max_batch_size full-length sequences need."""
    bc = engine.build_config
    tpb, per_block = bc.tokens_per_block, kv_bytes_per_token(engine) * bc.tokens_per_block
    ceiling = -(-bc.max_batch_size * bc.max_seq_len // tpb)
    if max_tokens is not None:
        if max_tokens < tpb:
            raise TrtcError(f"--kv_cache_max_tokens {max_tokens} is smaller than one block of {tpb} tokens")
        blocks = -(-max_tokens // tpb)
        free = free_memory_bytes(device)
        if blocks * per_block > free:
            raise TrtcError(f"--kv_cache_max_tokens {max_tokens} needs {blocks * per_block / 2**30:.2f} GiB of KV cache "
                            f"but {free / 2**30:.2f} GiB is free; pass a smaller --kv_cache_max_tokens")
        return blocks
    if not 0 < free_gpu_memory_fraction <= 1:
        raise TrtcError(f"--kv_cache_free_gpu_memory_fraction must be in (0, 1], got {free_gpu_memory_fraction}")
    if device.type == "cuda":
        budget = int(max(free_memory_bytes(device) - activation_bytes, 0) * free_gpu_memory_fraction)
    else:
        budget = int(free_memory_bytes(device) * CPU_KV_CACHE_FRACTION)
        ceiling = min(ceiling, -(-max(CPU_KV_CACHE_TOKENS, bc.max_seq_len) // tpb))
    blocks = min(budget // per_block, ceiling)
    if blocks * tpb < bc.max_seq_len:
        raise TrtcError(
            f"only {blocks * tpb} KV-cache tokens fit in memory, fewer than one sequence of max_seq_len "
            f"{bc.max_seq_len}; rebuild with a smaller --max_seq_len or free memory"
        )
    return blocks
