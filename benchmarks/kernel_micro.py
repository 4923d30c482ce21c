"""Microbenchmark of the Triton kernels at Llama-3.1-8B shapes (Hq 32, Hkv 8, D 128, hidden 4096,
MLP 14336, bf16, 16 tokens per block), against the ceilings measured in the same run.

    python benchmarks/kernel_micro.py [--json out.json] [--no-sweep]

(Not named kernels.py: a script's folder is on sys.path, and that name shadows the `kernels` package
transformers looks for.)

Ceilings: a 2 GiB device-to-device copy (bytes read + written) and an 8192^3 bf16 matmul on random data.
Timing: each case is captured with its rotation of input sets into one CUDA graph (as the runner's
decode graphs will run it), replayed, and timed with CUDA events; the median of the replays divided by
the calls in the graph. Input sets rotate so that a case's bytes exceed the L2 where memory allows (a
batch-1 case is latency-bound either way). Peers: the reference (what the runner runs today), timed
the same way (graph replay when capturable, else eager), and torch SDPA on contiguous (unpaged) K/V.
Bytes counted: each input read once, each output written once (attention: K and V of every context
token once, plus q and out). Prefill FLOPs: 4 * D * Hq * allowed (query, key) pairs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trtc.formats.graph import RopeConfig  # noqa: E402
from trtc.plugins.activation import reference as act_ref  # noqa: E402
from trtc.plugins.activation.triton import silu_and_mul  # noqa: E402
from trtc.plugins.attention import paged  # noqa: E402
from trtc.plugins.attention.rope import apply_rope, inv_freq, rope_cos_sin  # noqa: E402
from trtc.plugins.attention.triton_decode import decode_attention  # noqa: E402
from trtc.plugins.attention.triton_prefill import prefill_attention  # noqa: E402
from trtc.plugins.attention.triton_rope_kv import rope_and_write_kv  # noqa: E402
from trtc.plugins.norm import reference as norm_ref  # noqa: E402
from trtc.plugins.norm.triton import fused_add_rms_norm  # noqa: E402
from trtc.utils.gpu_timing import copies_past_l2, timed  # noqa: E402

HQ, HKV, D, HIDDEN, INTER, TPB = 32, 8, 128, 4096, 14336, 16
DT = torch.bfloat16
DEV = "cuda"
ROWS: list[dict] = []
DECODE_BATCHES, DECODE_CONTEXTS, SMALL_TOKENS = (1, 32, 256), (128, 512, 2048), (1, 32, 256, 2048)
PREFILL_CASES = {  # name: [(query_len, context_len)] per sequence
    "1x128": [(128, 128)], "1x512": [(512, 512)], "1x2048": [(2048, 2048)],
    "64x128": [(128, 128)] * 64, "4x2048": [(2048, 2048)] * 4, "chunk 512 @ ctx 2048": [(512, 2048)],
}
SWEEP_PREFILL = ("1x2048", "64x128")


def ceilings() -> tuple[float, float]:
    src = torch.randn(1 << 30, device=DEV, dtype=DT)  # 2 GiB
    dst = torch.empty_like(src)
    us, _ = timed([lambda: dst.copy_(src)], reps=20, graph=False)  # noqa: F821 (deleted after the call)
    copy_gbs = 2 * src.numel() * 2 / us / 1e3
    del src, dst
    a = torch.randn(8192, 8192, device=DEV, dtype=DT)
    b = torch.randn(8192, 8192, device=DEV, dtype=DT)
    us, _ = timed([lambda: a @ b], reps=10, graph=False)
    tflops = 2 * 8192**3 / us / 1e6
    return copy_gbs, tflops


def row(kernel, shape, us, how, bytes_=None, flops=None, ref_us=None, sdpa_us=None, note=""):
    r = dict(kernel=kernel, shape=shape, us=us, how=how, bytes=bytes_, flops=flops, ref_us=ref_us, sdpa_us=sdpa_us, note=note)
    ROWS.append(r)
    return r


# ---- paged KV pool shared by the attention cases ------------------------------------------------------
class Pool:
    def __init__(self, tokens: int) -> None:
        self.num_blocks = -(-tokens // TPB)
        self.k = torch.randn(self.num_blocks, TPB, HKV, D, device=DEV, dtype=DT)
        self.v = torch.randn(self.num_blocks, TPB, HKV, D, device=DEV, dtype=DT)
        self.gen = torch.Generator(device="cpu").manual_seed(0)

    def tables(self, batch: int, ctx: int, sets: int, width: int) -> list[torch.Tensor]:
        """`sets` block tables [batch, width] over disjoint random blocks (int32, -1 padded)."""
        per = -(-ctx // TPB)
        sets = max(1, min(sets, self.num_blocks // (batch * per)))
        perm = torch.randperm(self.num_blocks, generator=self.gen)
        out = []
        for s in range(sets):
            ids = perm[s * batch * per : (s + 1) * batch * per].view(batch, per)
            t = torch.full((batch, max(width, per)), -1, dtype=torch.int32)
            t[:, :per] = ids.to(torch.int32)
            out.append(t.to(DEV))
        return out


def bench_decode(pool: Pool, copy_gbs: float, sweep: bool) -> None:
    scale = 1 / math.sqrt(D)
    for batch in DECODE_BATCHES:
        for ctx in DECODE_CONTEXTS:
            kv_bytes = batch * ctx * HKV * D * 2 * 2
            io_bytes = 2 * batch * HQ * D * 2
            tables = pool.tables(batch, ctx, copies_past_l2(kv_bytes), width=4096 // TPB)
            qs = [torch.randn(batch, HQ, D, device=DEV, dtype=DT) for _ in tables]
            lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
            calls = [lambda q=q, t=t: decode_attention(q, pool.k, pool.v, t, lens, scale) for q, t in zip(qs, tables)]
            us, how = timed(calls)
            ql, pos = [1] * batch, (lens - 1).long()
            ref_calls = [lambda q=q, t=t: paged.paged_attention(q, pool.k, pool.v, t, ql, [ctx] * batch, pos, scale)
                         for q, t in zip(qs[:2], tables[:2])]
            ref_us, _ = timed(ref_calls, reps=3, graph=batch <= 32)
            # SDPA on contiguous K/V of the same sequences (no paging): a dense peer
            blocks = tables[0][:, : -(-ctx // TPB)].long()
            kc = pool.k[blocks].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()  # [B, Hkv, ctx, D]
            vc = pool.v[blocks].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
            q4 = qs[0][:, :, None, :]
            sdpa_us, _ = timed([lambda: F.scaled_dot_product_attention(q4, kc, vc, scale=scale, enable_gqa=True)])  # noqa: F821
            del kc, vc
            row("decode_attention", f"B={batch} ctx={ctx}", us, how, kv_bytes + io_bytes, ref_us=ref_us, sdpa_us=sdpa_us)
            if sweep:
                from trtc.plugins.attention.triton_decode import _num_sms, num_splits_for

                for block_n, warps in ((32, 4), (64, 4), (128, 4)):
                    ns = num_splits_for(batch, HKV, 4096, 32, _num_sms(0))
                    c = [lambda q=q, t=t, ns=ns, bn=block_n, w=warps: decode_attention(
                            q, pool.k, pool.v, t, lens, scale, num_splits=ns, block_n=bn, num_warps=w)
                         for q, t in zip(qs, tables)]
                    u, _ = timed(c)
                    row("  sweep decode", f"B={batch} ctx={ctx}", u, "graph", kv_bytes + io_bytes,
                        note=f"block_n={block_n} warps={warps} splits={ns}")


def prefill_case(pool: Pool, chunks: list[tuple[int, int]], tiles=None, peers=True):
    """chunks: [(query_len, context_len)] per sequence. Returns (us, how, flops, bytes, ref_us, sdpa_us)."""
    scale = 1 / math.sqrt(D)
    batch = len(chunks)
    max_ctx = max(c for _, c in chunks)
    t_tokens = sum(q for q, _ in chunks)
    pairs = sum(q * (c - q) + q * (q + 1) // 2 for q, c in chunks)
    flops = 4 * D * HQ * pairs
    qsl = torch.tensor([0] + list(torch.tensor([q for q, _ in chunks]).cumsum(0)), dtype=torch.int32, device=DEV)
    lens = torch.tensor([c for _, c in chunks], dtype=torch.int32, device=DEV)
    kv_bytes = sum(c for _, c in chunks) * HKV * D * 2 * 2
    tables = pool.tables(batch, max_ctx, copies_past_l2(kv_bytes, cap=8), width=-(-max_ctx // TPB))
    qs = [torch.randn(t_tokens, HQ, D, device=DEV, dtype=DT) for _ in tables]
    max_q = max(q for q, _ in chunks)
    calls = [lambda q=q, t=t: prefill_attention(q, pool.k, pool.v, t, qsl, lens, 0, batch, max_q, scale, tiles=tiles)
             for q, t in zip(qs, tables)]
    us, how = timed(calls)
    ref_us = sdpa_us = None
    if peers:
        pos = torch.cat([torch.arange(c - q, c) for q, c in chunks]).to(DEV)
        ql, cl = [q for q, _ in chunks], [c for _, c in chunks]
        ref_us, _ = timed([lambda: paged.paged_attention(qs[0], pool.k, pool.v, tables[0], ql, cl, pos, scale)], reps=3)
        if all(q == c and q == chunks[0][0] for q, c in chunks):  # equal fresh prompts: one causal SDPA batch
            L = chunks[0][0]
            blocks = tables[0][:, : -(-L // TPB)].long()
            kc = pool.k[blocks].flatten(1, 2)[:, :L].transpose(1, 2).contiguous()
            vc = pool.v[blocks].flatten(1, 2)[:, :L].transpose(1, 2).contiguous()
            q4 = qs[0].view(batch, L, HQ, D).transpose(1, 2)
            sdpa_us, _ = timed([lambda: F.scaled_dot_product_attention(q4, kc, vc, is_causal=True, scale=scale, enable_gqa=True)])
    return us, how, flops, kv_bytes + 2 * t_tokens * HQ * D * 2, ref_us, sdpa_us


def bench_prefill(pool: Pool, sweep: bool) -> None:
    cases = PREFILL_CASES
    for name, chunks in cases.items():
        us, how, flops, bytes_, ref_us, sdpa_us = prefill_case(pool, chunks)
        row("prefill_attention", name, us, how, bytes_, flops, ref_us, sdpa_us)
    if sweep:
        for name in SWEEP_PREFILL:
            for tiles in ((128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2)):
                try:
                    us, how, flops, bytes_, _, _ = prefill_case(pool, cases[name], tiles=tiles, peers=False)
                except Exception as e:  # noqa: BLE001 - a config that does not fit shared memory
                    print(f"  sweep prefill {name} {tiles}: {type(e).__name__}")
                    continue
                row("  sweep prefill", name, us, how, bytes_, flops, note=f"tiles={tiles}")


def bench_small_ops() -> None:
    for t in SMALL_TOKENS:
        # fused add + RMSNorm
        nbytes = t * HIDDEN * 2 * 4 + HIDDEN * 2
        sets = [(torch.randn(t, HIDDEN, device=DEV, dtype=DT), torch.randn(t, HIDDEN, device=DEV, dtype=DT)) for _ in range(copies_past_l2(nbytes))]
        w = torch.rand(HIDDEN, device=DEV, dtype=DT)
        us, how = timed([lambda x=x, r=r: fused_add_rms_norm(x, r, w, 1e-5) for x, r in sets] * max(1, 32 // len(sets)))
        ref_us, _ = timed([lambda x=x, r=r: norm_ref.fused_add_rms_norm(x, r, w, 1e-5) for x, r in sets])
        row("fused_add_rms_norm", f"T={t} hidden={HIDDEN}", us, how, nbytes, ref_us=ref_us)
        # SwiGLU
        nbytes = t * INTER * 2 * 3
        sets = [torch.randn(t, 2 * INTER, device=DEV, dtype=DT) for _ in range(copies_past_l2(nbytes))]
        us, how = timed([lambda x=x: silu_and_mul(x) for x in sets] * max(1, 32 // len(sets)))
        ref_us, _ = timed([lambda x=x: act_ref.silu_and_mul(x) for x in sets])
        row("silu_and_mul", f"T={t} I={INTER}", us, how, nbytes, ref_us=ref_us)
        # RoPE (llama3) + KV-cache write
        rope = RopeConfig(type="llama3", theta=500000.0, factor=8.0, original_max_position_embeddings=8192)
        cos, sin = (x.to(DEV) for x in rope_cos_sin(inv_freq(rope, D), torch.arange(8192), DT))
        nbytes = t * D * 2 * ((HQ + 2 * HKV) + (HQ + 3 * HKV) + 2)
        blocks = max(64, -(-t // TPB) * 4)
        kc = torch.randn(blocks, TPB, HKV, D, device=DEV, dtype=DT)
        vc = torch.randn_like(kc)
        sets = []
        for _ in range(copies_past_l2(nbytes)):
            qkv = torch.randn(t, (HQ + 2 * HKV) * D, device=DEV, dtype=DT)
            q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], dim=-1)
            pos = torch.randint(0, 8192, (t,), device=DEV)
            slots = torch.randperm(blocks * TPB, device=DEV)[:t]
            sets.append((q.view(t, HQ, D), k.view(t, HKV, D), v.view(t, HKV, D), pos, slots))
        us, how = timed([lambda s=s: rope_and_write_kv(s[0], s[1], s[2], cos, sin, s[3], kc, vc, s[4]) for s in sets] * max(1, 32 // len(sets)))

        def ref(s):
            c, sn = cos[s[3]], sin[s[3]]
            qr, kr = apply_rope(s[0], c, sn), apply_rope(s[1], c, sn)
            paged.write_kv(kc, vc, kr, s[2], s[4])
            return qr
        ref_us, _ = timed([lambda s=s: ref(s) for s in sets])
        row("rope_and_write_kv", f"T={t} llama3", us, how, nbytes, ref_us=ref_us)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    copy_gbs, gemm_tflops = ceilings()
    print(f"{props.name}: {props.multi_processor_count} SMs, L2 {props.L2_cache_size / 1e6:.0f} MB; measured copy "
          f"{copy_gbs:.0f} GB/s (read+write), bf16 GEMM 8192^3 {gemm_tflops:.0f} TFLOP/s")
    bench_small_ops()
    pool = Pool(max(DECODE_BATCHES) * max(DECODE_CONTEXTS) + 64 * 128 * 8)  # ~1.1 GiB each for K and V
    bench_decode(pool, copy_gbs, sweep=not args.no_sweep)
    bench_prefill(pool, sweep=not args.no_sweep)

    print(f"\n{'kernel':<20} {'shape':<22} {'us':>8} {'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8} {'%gemm':>6} "
          f"{'ref us':>9} {'x ref':>6} {'sdpa us':>8}  note")
    for r in ROWS:
        gbs = r["bytes"] / r["us"] / 1e3 if r["bytes"] else None
        tf = r["flops"] / r["us"] / 1e6 if r["flops"] else None
        r.update(gbs=gbs, tflops=tf, copy_gbs=copy_gbs, gemm_tflops=gemm_tflops)
        f = lambda v, fmt: format(v, fmt) if v is not None else "-"  # noqa: E731
        print(f"{r['kernel']:<20} {r['shape']:<22} {r['us']:>8.1f} {f(gbs, '7.0f'):>7} "
              f"{f(gbs and 100 * gbs / copy_gbs, '5.1f'):>6} {f(tf, '8.1f'):>8} {f(tf and 100 * tf / gemm_tflops, '5.1f'):>6} "
              f"{f(r['ref_us'], '9.1f'):>9} {f(r['ref_us'] and r['ref_us'] / r['us'], '6.1f'):>6} "
              f"{f(r['sdpa_us'], '8.1f'):>8}  {r['how']} {r['note']}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=props.name, copy_gbs=copy_gbs, gemm_tflops=gemm_tflops, rows=ROWS), indent=1))


if __name__ == "__main__":
    main()
