"""The attention kernels (Triton) against their references, on fresh random inputs.

Every output buffer is NaN-poisoned before the kernel runs, and so is every KV-cache slot that no
sequence owns (the tail of a sequence's last block, blocks nobody holds): a kernel that reads a slot
it must not, or leaves an output unwritten, fails. References run in float32 on upcast inputs.
Tolerances (bf16 and fp16 inputs):
  attention output: elementwise |out - ref| <= 2e-2 + 2e-2 |ref|, and ||out - ref|| / ||ref|| < 1e-2
  (the bf16 reference path itself lands near 3e-3 against float32);
  RoPE: q_rot and k_rot within 1e-2 + 1e-2 |ref| of float32 RoPE, the cache holds exactly k_rot and v,
  slots outside slot_mapping stay untouched.
The GPU cases are marked `gpu`; `test_interpreter_small` runs a few small cases on the CPU through
Triton's interpreter (TRITON_INTERPRET=1, in a subprocess, fp16 since the interpreter's bf16 dot is wrong).
FP8 pool (float8_e4m3fn with a float32 scale each for K and V): attention within the same tolerances
of the float32 reference over the dequantized pool; the RoPE write stores exactly fp8(k_rot / k_scale).
"""

from __future__ import annotations

import math

import pytest
import torch

from trtc.formats.graph import RopeConfig
from trtc.formats.quant_layout import dequantize_fp8, quantize_fp8
from trtc.plugins.attention import paged, paged_attention, rope_and_write_kv
from trtc.plugins.attention.metadata import AttentionMetadata
from trtc.plugins.attention.rope import apply_rope, inv_freq, rope_cos_sin

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_batch(specs, hq, hkv, dim, tpb, dtype, device, seed, table_pad=2):
    """specs: [(query_len, context_len)] per sequence, decodes (query_len 1) first. Returns
    (q, k_cache, v_cache, meta) with each sequence on random distinct blocks and unowned slots NaN."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    blocks_per_seq = [-(-ctx // tpb) for _, ctx in specs]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=g)
    width = max(blocks_per_seq) + table_pad
    tables = torch.full((len(specs), width), -1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, tpb, hkv, dim), float("nan"))
    v_cache = torch.full((num_blocks, tpb, hkv, dim), float("nan"))
    positions, slots, used = [], [], 0
    for b, (n, ctx) in enumerate(specs):
        ids = perm[used : used + blocks_per_seq[b]]
        used += blocks_per_seq[b]
        tables[b, : len(ids)] = ids.to(torch.int32)
        for j in range(ctx):  # every cached token of the sequence gets random K/V
            k_cache[ids[j // tpb], j % tpb] = torch.randn(hkv, dim, generator=g)
            v_cache[ids[j // tpb], j % tpb] = torch.randn(hkv, dim, generator=g)
        pos = torch.arange(ctx - n, ctx)
        positions.append(pos)
        slots.append(ids[pos // tpb] * tpb + pos % tpb)
    total = sum(n for n, _ in specs)
    q = torch.randn(total, hq, dim, generator=g)
    nd = 0
    while nd < len(specs) and specs[nd][0] == 1 and nd < len(specs):
        nd += 1
    meta = AttentionMetadata(
        positions=torch.cat(positions).to(device), slot_mapping=torch.cat(slots).to(device),
        block_tables=tables.to(device), query_lens=[n for n, _ in specs], context_lens=[c for _, c in specs],
        num_decodes=nd,
    )
    return q.to(device, dtype), k_cache.to(device, dtype), v_cache.to(device, dtype), meta


def reference_fp32(q, k_cache, v_cache, meta, scale, window, cap):
    return paged.paged_attention(
        q.float(), k_cache.float(), v_cache.float(), meta.block_tables, meta.query_lens, meta.context_lens,
        meta.positions, scale, window, cap,
    )


def check_attention(specs, hq, hkv, dim, tpb, dtype, device, seed, window=None, cap=None, run=None):
    q, kc, vc, meta = make_batch(specs, hq, hkv, dim, tpb, dtype, device, seed)
    scale = 1 / math.sqrt(dim)
    out = torch.full_like(q, float("nan"))
    if run is None:  # the op as the runner calls it
        got = paged_attention(q, kc, vc, meta, scale, window, cap, out=out)
    else:
        got = run(q, kc, vc, meta, scale, window, cap, out)
    ref = reference_fp32(q, kc, vc, meta, scale, window, cap)
    assert got.data_ptr() == out.data_ptr()
    assert torch.isfinite(got).all(), f"unwritten or NaN rows: {(~torch.isfinite(got)).any(-1).any(-1).nonzero().flatten().tolist()}"
    rel = ((got.float() - ref).norm() / ref.norm()).item()
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)
    assert rel < 1e-2, rel
    return rel


# (query_len, context_len) per sequence: decodes first, then prefill chunks over cached prefixes
MIXED = [(1, 1), (1, 17), (1, 300), (1, 64), (37, 37), (5, 100), (70, 133), (1, 50)]
CASES = [  # hq, hkv, dim, tpb
    (8, 8, 64, 16),  # MHA
    (16, 4, 128, 16),  # GQA 4
    (32, 4, 128, 32),  # GQA 8
    (8, 1, 64, 32),  # MQA
    (8, 2, 80, 16),  # head_dim not a power of two (padded, masked)
    (8, 4, 256, 16),  # head_dim 256
]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("hq,hkv,dim,tpb", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_batch(hq, hkv, dim, tpb, dtype):
    check_attention(MIXED, hq, hkv, dim, tpb, dtype, "cuda", seed=hq * dim + tpb)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("window,cap", [(None, 30.0), (40, None), (7, 50.0)])
def test_sliding_window_and_soft_cap(window, cap):
    check_attention(MIXED, 16, 4, 128, 16, torch.bfloat16, "cuda", seed=3, window=window, cap=cap)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("batch,ctx", [(1, 2048), (3, 1000), (64, 129), (256, 33)])
def test_decode_only(batch, ctx):
    """Decode batches as the runner sends them (split-KV at small batch, one split at large)."""
    g = torch.Generator().manual_seed(batch)
    specs = [(1, int(c)) for c in torch.randint(1, ctx + 1, (batch,), generator=g)]
    specs[0] = (1, ctx)
    check_attention(specs, 32, 8, 128, 16, torch.bfloat16, "cuda", seed=batch)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_decode_forced_splits(num_splits):
    from trtc.plugins.attention.triton_decode import decode_attention

    def run(q, kc, vc, meta, scale, window, cap, out):
        return decode_attention(q, kc, vc, meta.block_tables, meta.context_lens_tensor, scale, window, cap,
                                out=out, num_splits=num_splits)

    specs = [(1, c) for c in (1, 2, 15, 16, 17, 250, 513)]
    check_attention(specs, 32, 8, 128, 32, torch.bfloat16, "cuda", seed=num_splits, run=run)
    check_attention(specs, 32, 8, 128, 32, torch.bfloat16, "cuda", seed=num_splits, run=run, window=20)


@pytest.mark.gpu
@cuda
def test_chunked_prefill_long():
    """Prefill chunks deep into long contexts (several query tiles, many key tiles), no decodes."""
    specs = [(512, 2048), (200, 200), (129, 1500), (1, 700)]
    check_attention(specs, 32, 8, 128, 16, torch.bfloat16, "cuda", seed=11)
    check_attention(specs, 32, 8, 128, 16, torch.bfloat16, "cuda", seed=12, window=256)


@pytest.mark.gpu
@cuda
def test_launchers_keep_no_input_alive():
    """Decode and prefill attention hold nothing of a call once it returns: after 20 calls on fresh
    q and output tensors, the allocated memory is no more than after the first (a cache keyed on the
    tensors would keep every step's q alive)."""
    specs = [(1, 300), (1, 17), (37, 100), (64, 64)]
    _, kc, vc, meta = make_batch(specs, 32, 8, 128, 16, torch.bfloat16, "cuda", seed=7)
    total, scale = sum(n for n, _ in specs), 1 / math.sqrt(128)

    def call():
        q = torch.randn(total, 32, 128, dtype=torch.bfloat16, device="cuda")
        paged_attention(q, kc, vc, meta, scale, out=torch.empty_like(q))

    call()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(20):
        call()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before  # 20 kept q's would be 20 x 2.6 MiB more


@pytest.mark.gpu
@cuda
def test_decode_cuda_graph():
    """The decode path captures into a CUDA graph and replays right with new lengths and tables,
    including a padding row of context 0 (it gets zeros, not NaN)."""
    specs = [(1, 300), (1, 17), (1, 1000), (1, 64), (1, 40)]
    q, kc, vc, meta = make_batch(specs, 32, 8, 128, 16, torch.bfloat16, "cuda", seed=5)
    out = torch.full_like(q, float("nan"))
    scale = 1 / math.sqrt(128)
    paged_attention(q, kc, vc, meta, scale, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention(q, kc, vc, meta, scale, out=out)
    # each sequence now reads another's blocks, up to the tokens written there (40, 64, 1000, 17, 300)
    new_ctx = torch.tensor([40, 63, 1000, 1, 0], dtype=torch.int32, device="cuda")
    meta.context_lens_tensor.copy_(new_ctx)
    meta.block_tables.copy_(meta.block_tables.flip(0))
    out.fill_(float("nan"))
    graph.replay()
    meta.context_lens = [40, 63, 1000, 1, 1]  # the reference cannot take context 0: row 4 checked apart
    meta.positions = torch.tensor(meta.context_lens, device="cuda") - 1  # its causal mask reads positions
    ref = reference_fp32(q, kc, vc, meta, scale, None, None)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:4].float(), ref[:4], atol=2e-2, rtol=2e-2)
    assert (out[4] == 0).all()


def check_attention_fp8_pool(specs, hq, hkv, dim, tpb, dtype, device, seed, window=None, cap=None, run=None):
    """The same batch with its cache in an FP8 pool (fp8(k / k_scale), NaN kept in unowned slots):
    the kernels against the float32 reference over the dequantized pool."""
    q, kc, vc, meta = make_batch(specs, hq, hkv, dim, tpb, dtype, device, seed)
    ks, vs = torch.tensor(0.011, device=device), torch.tensor(0.013, device=device)
    kc8, vc8 = quantize_fp8(kc, ks), quantize_fp8(vc, vs)
    scale = 1 / math.sqrt(dim)
    out = torch.full_like(q, float("nan"))
    if run is None:
        got = paged_attention(q, kc8, vc8, meta, scale, window, cap, out=out, k_scale=ks, v_scale=vs)
    else:
        got = run(q, kc8, vc8, meta, scale, window, cap, out, ks, vs)
    ref = reference_fp32(q, dequantize_fp8(kc8, ks, dtype), dequantize_fp8(vc8, vs, dtype), meta, scale, window, cap)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)
    assert ((got.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("hq,hkv,dim,tpb", [(32, 8, 128, 32), (8, 2, 80, 16)])
@pytest.mark.parametrize("window,cap", [(None, None), (40, 30.0)])
def test_fp8_pool(hq, hkv, dim, tpb, window, cap):
    check_attention_fp8_pool(MIXED, hq, hkv, dim, tpb, torch.bfloat16, "cuda", seed=dim, window=window, cap=cap)


def check_rope_kv_fp8(t, hq, hkv, dim, tpb, dtype, device, seed):
    """RoPE + write into an FP8 pool: the cache holds exactly fp8(k_rot / k_scale), fp8(v / v_scale)."""
    from trtc.plugins.attention.triton_rope_kv import rope_and_write_kv as kernel

    g = torch.Generator().manual_seed(seed)
    cos, sin = rope_cos_sin(inv_freq(RopeConfig(theta=10000.0), dim), torch.arange(1024), dtype)
    q, k, v = (torch.randn(t, h, dim, generator=g).to(dtype) for h in (hq, hkv, hkv))
    positions = torch.randint(0, 1024, (t,), generator=g)
    num_blocks = -(-t // tpb) + 2
    slots = torch.randperm(num_blocks * tpb, generator=g)[:t]
    ks, vs = torch.tensor(0.009), torch.tensor(0.012)
    k_cache = torch.zeros((num_blocks, tpb, hkv, dim), dtype=torch.float8_e4m3fn)
    v_cache = k_cache.clone()
    q, k, v, cos, sin, positions, slots, k_cache, v_cache, ks, vs = (
        x.to(device) for x in (q, k, v, cos, sin, positions, slots, k_cache, v_cache, ks, vs))
    q_rot, k_rot = kernel(q, k, v, cos, sin, positions, k_cache, v_cache, slots, k_scale=ks, v_scale=vs)
    c, s = cos[positions].float(), sin[positions].float()
    torch.testing.assert_close(k_rot.float(), apply_rope(k.float(), c, s), atol=1e-2, rtol=1e-2)
    flat_k, flat_v = k_cache.view(-1, hkv, dim).view(torch.uint8), v_cache.view(-1, hkv, dim).view(torch.uint8)
    # Triton's CPU interpreter mis-rounds values that round up to a power of two (to half of it): there,
    # >= 90% of the bytes must match
    need = 1.0 if device != "cpu" else 0.9
    assert (flat_k[slots] == quantize_fp8(k_rot, ks).view(torch.uint8)).float().mean() >= need
    assert (flat_v[slots] == quantize_fp8(v, vs).view(torch.uint8)).float().mean() >= need


@pytest.mark.gpu
@cuda
def test_rope_and_write_kv_fp8_pool():
    check_rope_kv_fp8(300, 32, 8, 128, 32, torch.bfloat16, "cuda", seed=3)


def check_rope_kv(t, hq, hkv, dim, tpb, dtype, device, seed, rope_type="default", rotary_dim=None):
    from trtc.plugins.attention.triton_rope_kv import rope_and_write_kv as kernel

    g = torch.Generator().manual_seed(seed)
    rope = (RopeConfig(type="llama3", theta=500000.0, factor=8.0, original_max_position_embeddings=8192)
            if rope_type == "llama3" else RopeConfig(theta=10000.0))  # Llama-3.1's llama3 scaling
    cos, sin = rope_cos_sin(inv_freq(rope, rotary_dim or dim), torch.arange(4096), dtype)  # [4096, R]
    qkv = torch.randn(t, (hq + 2 * hkv) * dim, generator=g).to(dtype)  # strided views, as the runner splits them
    q, k, v = qkv.split([hq * dim, hkv * dim, hkv * dim], dim=-1)
    q, k, v = q.reshape(t, hq, dim), k.reshape(t, hkv, dim), v.reshape(t, hkv, dim)
    num_blocks = -(-t // tpb) + 4
    positions = torch.randint(0, 4096, (t,), generator=g)
    slots = torch.randperm(num_blocks * tpb, generator=g)[:t]
    k_cache = torch.full((num_blocks, tpb, hkv, dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    dev = lambda x: x.to(device)  # noqa: E731
    q, k, v, cos, sin, positions, slots, k_cache, v_cache = map(dev, (q, k, v, cos, sin, positions, slots, k_cache, v_cache))
    q_out = torch.full((t, hq, dim), float("nan"), dtype=dtype, device=device)
    k_out = torch.full((t, hkv, dim), float("nan"), dtype=dtype, device=device)
    q_rot, k_rot = kernel(q, k, v, cos, sin, positions, k_cache, v_cache, slots, q_out=q_out, k_out=k_out)
    c, s = cos[positions].float(), sin[positions].float()
    torch.testing.assert_close(q_rot.float(), apply_rope(q.float(), c, s), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(k_rot.float(), apply_rope(k.float(), c, s), atol=1e-2, rtol=1e-2)
    flat_k, flat_v = k_cache.view(-1, hkv, dim), v_cache.view(-1, hkv, dim)
    assert torch.equal(flat_k[slots], k_rot) and torch.equal(flat_v[slots], v)
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool, device=device)
    untouched[slots] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("t,hq,hkv,dim,tpb", [(1, 32, 8, 128, 16), (300, 32, 8, 128, 32), (77, 8, 8, 64, 16), (5, 12, 4, 80, 16)])
@pytest.mark.parametrize("rope_type", ["default", "llama3"])
def test_rope_and_write_kv(t, hq, hkv, dim, tpb, rope_type):
    check_rope_kv(t, hq, hkv, dim, tpb, torch.bfloat16, "cuda", seed=t + dim, rope_type=rope_type)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dim,rotary_dim", [(128, 64), (96, 24), (256, 256)])  # Phi-4-mini-like, Nemotron-like, Gemma
def test_rope_and_write_kv_partial_rotary(dim, rotary_dim):
    check_rope_kv(77, 16, 4, dim, 16, torch.bfloat16, "cuda", seed=dim, rotary_dim=rotary_dim)


@pytest.mark.gpu
@cuda
def test_rope_dispatch_matches_reference_path():
    """The op as the runner calls it: kernel on CUDA equals the reference path within bf16 rounding."""
    g = torch.Generator().manual_seed(0)
    t, hq, hkv, dim, tpb = 40, 32, 8, 128, 16
    cos, sin = rope_cos_sin(inv_freq(RopeConfig(), dim), torch.arange(512), torch.bfloat16)
    q, k, v = (torch.randn(t, h, dim, generator=g).bfloat16().cuda() for h in (hq, hkv, hkv))
    pos = torch.randperm(512, generator=g)[:t].cuda()
    slots = torch.randperm(8 * tpb, generator=g)[:t].cuda()
    caches = [torch.zeros(8, tpb, hkv, dim, dtype=torch.bfloat16, device="cuda") for _ in range(4)]
    cos, sin = cos.cuda(), sin.cuda()
    q1, k1 = rope_and_write_kv(q, k, v, cos, sin, pos, caches[0], caches[1], slots)
    c, s = cos[pos], sin[pos]
    q2, k2 = apply_rope(q, c, s), apply_rope(k, c, s)
    paged.write_kv(caches[2], caches[3], k2, v, slots)
    torch.testing.assert_close(q1, q2, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(caches[0], caches[2], atol=2e-2, rtol=2e-2)
    assert torch.equal(caches[1], caches[3])


def _interpreter_cases() -> None:
    """Small cases on CPU tensors through Triton's interpreter (run with TRITON_INTERPRET=1)."""
    from trtc.plugins.attention.triton_decode import decode_attention
    from trtc.plugins.attention.triton_prefill import prefill_attention

    def run(q, kc, vc, meta, scale, window, cap, out):
        nd, b = meta.num_decodes, len(meta.query_lens)
        decode_attention(q[:nd], kc, vc, meta.block_tables, meta.context_lens_tensor, scale, window, cap,
                         out=out[:nd], num_splits=2)
        return prefill_attention(q, kc, vc, meta.block_tables, meta.query_start_loc, meta.context_lens_tensor,
                                 nd, b - nd, meta.max_query_len, scale, window, cap, out=out)

    specs = [(1, 1), (1, 40), (20, 20), (9, 45)]
    check_attention(specs, 8, 2, 32, 16, torch.float16, "cpu", seed=1, run=run)
    check_attention(specs, 8, 2, 32, 16, torch.float16, "cpu", seed=2, run=run, window=10, cap=20.0)
    check_rope_kv(9, 4, 2, 32, 16, torch.float16, "cpu", seed=0, rope_type="llama3")
    check_rope_kv(9, 4, 2, 40, 16, torch.float16, "cpu", seed=1, rotary_dim=16)  # partial rotary

    def run_fp8(q, kc, vc, meta, scale, window, cap, out, ks, vs):
        nd, b = meta.num_decodes, len(meta.query_lens)
        decode_attention(q[:nd], kc, vc, meta.block_tables, meta.context_lens_tensor, scale, window, cap,
                         out=out[:nd], num_splits=2, k_scale=ks, v_scale=vs)
        return prefill_attention(q, kc, vc, meta.block_tables, meta.query_start_loc, meta.context_lens_tensor,
                                 nd, b - nd, meta.max_query_len, scale, window, cap, out=out, k_scale=ks, v_scale=vs)

    check_attention_fp8_pool(specs, 8, 2, 32, 16, torch.float16, "cpu", seed=3, run=run_fp8)
    check_rope_kv_fp8(9, 4, 2, 32, 16, torch.float16, "cpu", seed=0)


def test_interpreter_small():
    from triton_interpreter import run_under_interpreter  # tests/ is on the path under pytest only

    run_under_interpreter(__file__)


if __name__ == "__main__":
    _interpreter_cases()
    print("interpreter cases passed")


@pytest.mark.parametrize("hq,hkv,dim,tpb", CASES[:5])
@pytest.mark.parametrize("window", [None, 40])
def test_cpu_path_equals_the_reference(hq, hkv, dim, tpb, window):
    """The CPU path (decodes batched, each prefill chunk in one call, torch's fused attention) computes
    the per-sequence reference's attention: float32, 1e-5. Unowned slots hold large finite garbage
    (the CPU path reads the padding of its gathered blocks and masks it)."""
    from trtc.plugins.attention import cpu

    q, kc, vc, meta = make_batch(MIXED, hq, hkv, dim, tpb, torch.float32, "cpu", seed=hq + dim)
    kc, vc = kc.nan_to_num(1e4), vc.nan_to_num(-1e4)
    scale = 1 / math.sqrt(dim)
    got = cpu.paged_attention(q, kc, vc, meta, scale, window)
    ref = reference_fp32(q, kc, vc, meta, scale, window, None)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paged_attention(q, kc, vc, meta, scale, window), ref, atol=1e-5, rtol=1e-5)


def test_cpu_path_reads_an_fp8_pool():
    from trtc.plugins.attention import cpu

    q, kc, vc, meta = make_batch(MIXED, 8, 2, 64, 16, torch.float32, "cpu", seed=3)
    k_scale, v_scale = torch.tensor(0.02), torch.tensor(0.03)
    kq, vq = quantize_fp8(kc.nan_to_num(0.0), k_scale), quantize_fp8(vc.nan_to_num(0.0), v_scale)
    got = cpu.paged_attention(q, kq, vq, meta, 0.125, None, k_scale, v_scale)
    ref = reference_fp32(q, dequantize_fp8(kq, k_scale, torch.float32), dequantize_fp8(vq, v_scale, torch.float32),
                         meta, 0.125, None, None)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool_dtype,own", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)])
def test_cpu_decode_kv_carried_across_steps(pool_dtype, own):
    """Decode steps through DecodeKV (the decodes' keys and values kept contiguous from step to step,
    one token appended per step, grown past its capacity, rebuilt when a sequence leaves the batch)
    give the per-sequence reference's attention over the pool at every step; `own`: the step's new
    keys and values passed in (rounded to the pool's dtype) instead of read back."""
    from trtc.plugins.attention import cpu, paged

    g = torch.Generator().manual_seed(5)
    hq, hkv, dim, tpb, steps = 4, 2, 16, 8, 70
    lens = [5, 17, 30]  # context before the first step
    width = -(-(max(lens) + steps) // tpb)
    tables = torch.randperm(len(lens) * width, generator=g).to(torch.int32).view(len(lens), width)
    k_cache = torch.randn(len(lens) * width, tpb, hkv, dim, generator=g).to(pool_dtype)
    v_cache = torch.randn(len(lens) * width, tpb, hkv, dim, generator=g).to(pool_dtype)
    decode_kv, seqs, continued = cpu.DecodeKV(num_layers=1), [0, 1, 2], 0
    for step in range(steps):
        if step == 40:
            seqs = [0, 2]  # sequence 1 finished: the batch changes
        pos = torch.tensor([lens[s] for s in seqs])
        slots = tables[seqs, pos // tpb].long() * tpb + pos % tpb
        k, v = torch.randn(len(seqs), hkv, dim, generator=g), torch.randn(len(seqs), hkv, dim, generator=g)
        paged.write_kv(k_cache, v_cache, k, v, slots)
        for s in seqs:
            lens[s] += 1
        meta = AttentionMetadata(positions=pos, slot_mapping=slots, block_tables=tables[seqs], query_lens=[1] * len(seqs),
                                 context_lens=[lens[s] for s in seqs], num_decodes=len(seqs))
        q = torch.randn(len(seqs), hq, dim, generator=g)
        decode_kv.begin_step(meta)
        continued += decode_kv.continues
        got = cpu.paged_attention(q, k_cache, v_cache, meta, 0.25, None, None, None, *((k, v) if own else (None, None)),
                                  decode_kv, 0)
        ref = reference_fp32(q, k_cache, v_cache, meta, 0.25, None, None)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=f"step {step}")
    assert continued == steps - 2, "every step but the first and the one after the batch changed appends"
