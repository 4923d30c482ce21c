"""The trtc ONNX ops' implementations on a GPU (trtc/onnx/torch_ops.py), as the TensorRT plugins
call them on a plan's buffers: PagedAttention through trtc's Triton kernels (RoPE fused with the
KV write, varlen attention with every sequence a chunk, no host sync) on the stacked pool's views,
against the same op on CPU in float32 (the references). Marked gpu: skipped without one."""

from __future__ import annotations

import pytest
import torch

from trtc.formats.graph import RopeConfig
from trtc.onnx import torch_ops
from trtc.plugins.attention.rope import inv_freq, rope_cos_sin

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]
HQ, HKV, D, P, N = 8, 2, 64, 16, 32


def mixed_step(g: torch.Generator, dtype: torch.dtype):
    """Two decodes (contexts 37 and 5) and a 20-token prefill chunk over 23 cached tokens, on
    scattered blocks of a pool already holding the cached K/V."""
    context, query = [37, 5, 43], [1, 1, 20]
    perm = torch.randperm(N, generator=g)
    tables, used = [], 0
    for c in context:
        n = -(-c // P)
        tables.append(perm[used:used + n].tolist() + [-1] * (3 - n))
        used += n
    positions = torch.cat([torch.arange(c - q, c) for c, q in zip(context, query)])
    table = torch.tensor(tables, dtype=torch.int32)
    seq = torch.repeat_interleave(torch.arange(3), torch.tensor(query))
    slots = table[seq, positions // P].long() * P + positions % P
    cos, sin = rope_cos_sin(inv_freq(RopeConfig(theta=10000.0), D), positions, torch.float32)
    inputs = dict(
        qkv=torch.randn(len(positions), (HQ + 2 * HKV) * D, generator=g).to(dtype), rope_cos=cos.to(dtype),
        rope_sin=sin.to(dtype), kv_cache_pool=torch.randn(2, N, P, HKV, D, generator=g).to(dtype),
        k_scale=torch.tensor(1.0), v_scale=torch.tensor(1.0), slot_mapping=slots, block_tables=table,
        context_lens=torch.tensor(context, dtype=torch.int32),
        query_start_loc=torch.tensor([0, 1, 2, 22], dtype=torch.int32),
    )
    return inputs, slots


ATTRS = dict(num_heads=HQ, num_kv_heads=HKV, head_dim=D, tokens_per_block=P, scale=D**-0.5)


@pytest.mark.parametrize("sliding_window, soft_cap", [(0, 0.0), (9, 30.0)])
def test_paged_attention_kernels_match_reference(sliding_window, soft_cap):
    inputs, slots = mixed_step(torch.Generator().manual_seed(0), torch.bfloat16)
    attrs = dict(ATTRS, sliding_window=sliding_window, soft_cap=soft_cap)
    ref = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
    want = torch_ops.paged_attention(**ref, **attrs)
    gpu = {k: v.cuda() for k, v in inputs.items()}
    got = torch_ops.paged_attention(**gpu, **attrs)
    assert float((got.float().cpu() - want).abs().max() / want.abs().max()) < 2e-2
    pool, pool_want = gpu["kv_cache_pool"].float().cpu(), ref["kv_cache_pool"]
    written = pool.flatten(1, 2)[:, slots]  # [2, T, Hkv, D]: the step's K (rotated) and V, in place
    assert float((written - pool_want.flatten(1, 2)[:, slots]).abs().max()) < 5e-2
    assert not torch.equal(written, inputs["kv_cache_pool"].float().flatten(1, 2)[:, slots])


def test_fp8_pool_on_gpu_matches_cpu():
    inputs, _ = mixed_step(torch.Generator().manual_seed(1), torch.bfloat16)
    inputs["kv_cache_pool"] = (inputs["kv_cache_pool"].float() / 0.02).clamp(-448, 448).to(torch.float8_e4m3fn)
    inputs["k_scale"], inputs["v_scale"] = torch.tensor(0.02), torch.tensor(0.03)
    attrs = dict(ATTRS, sliding_window=0, soft_cap=0.0)
    want = torch_ops.paged_attention(**{k: v.clone() for k, v in inputs.items()}, **attrs)
    got = torch_ops.paged_attention(**{k: v.cuda() for k, v in inputs.items()}, **attrs)
    assert float((got.float().cpu() - want.float()).abs().max() / want.float().abs().max()) < 2e-2
