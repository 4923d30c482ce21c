"""The large-M W4A16 GEMMs (trtc/plugins/gemm/w4a16_tc.py: the tensor-core GEMM with in-register
dequantization, and dequantize + cuBLAS) against the reference W4A16 (dequantized weight @ x) for
AWQ (zero points, pre_quant_scale) and GPTQ (symmetric, act-order input_perm) layouts.

Tolerances: GEMM outputs within max|y - ref| <= 1e-2 * max|ref| of the reference in float32 on the
same quantized operands (the kernels round the dequantized weight to the model dtype, as the bf16
reference does); the dequantized weight within one rounding (half a unit in the last place, plus
2^-15 of the largest scale: the rounding of the fma's constant (128 + z) s) of the float32 value, and >= 99.9% of it the reference's bytes
when no pre_quant_scale is folded in (under the interpreter, whose float32 -> bf16 cast does not
round, bf16 within 2^-6 relative). `test_interpreter_small` runs small cases on the CPU through Triton's interpreter.
"""

from __future__ import annotations

import pytest
import torch
import triton
from test_quant_gemm_kernels import check_int4, close, cuda, make_int4  # tests/plugins: the shared checks

from trtc.plugins.gemm import linear, w4a16_tc
from trtc.plugins.gemm.linear import run_tactic
from trtc.plugins.gemm.tactics import Tactic, TacticTable, default_tactic, fit_stages, gemm_key
from trtc.plugins.gemm.w4a16 import dequantize_int4, w4a16_linear

TC = Tactic("triton_tc", block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4)
TC_SWAP = Tactic("triton_tc", block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4, swap_ab=True)
TC_K128 = Tactic("triton_tc", block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3)
TC_256 = Tactic("triton_tc", block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=4)
TC_SPLIT = Tactic("triton_tc", block_m=128, block_n=64, block_k=64, split_k=2, num_warps=4, num_stages=4)
DEQUANT_MM = Tactic("dequant_mm")


def check_dequantize(n, k, group, zero, pqs, dtype, device, seed=0):
    w = make_int4(n, k, group, zero, pqs, False, seed, device)
    got = w4a16_tc.dequantize(w["weight"], w["weight_scale"], w.get("weight_zero"), w.get("pre_quant_scale"), dtype)
    ref = dequantize_int4(w["weight"], w["weight_scale"], w.get("weight_zero"), torch.float32)
    if pqs:
        ref = ref * w["pre_quant_scale"]
    assert got.dtype == dtype and got.shape == (n, k)
    if device == "cpu" and dtype == torch.bfloat16:  # the interpreter's float32 -> bf16 cast does not round
        assert ((got.float() - ref).abs() <= 2.0 ** -6 * ref.abs() + 1e-6).all()
        return
    ulp = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)  # the dtype's unit roundoff (half its relative spacing)
    fma = 2.0 ** -15 * w["weight_scale"].max() * (w["pre_quant_scale"].max() if pqs else 1)  # its constant's rounding
    assert ((got.float() - ref).abs() <= ulp * ref.abs() + fma).all()  # one rounding


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("group,zero,pqs", [(128, True, True), (32, False, False), (64, True, False), (4096, False, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_kernel(group, zero, pqs, dtype):
    check_dequantize(1000, 4096, group, zero, pqs, dtype, "cuda")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("m", [65, 128, 300, 1000])
@pytest.mark.parametrize("tactic", [TC, TC_SWAP, TC_K128, TC_256, TC_SPLIT, DEQUANT_MM],
                         ids=["tc", "tc_swap", "tc_k128", "tc_256", "tc_split2", "dequant_mm"])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (200, 384)])  # 200: a partial tile of N
def test_w4a16_large_m_awq_shapes(m, tactic, n, k):
    check_int4(m, n, k, 128, zero=True, pqs=True, perm=False, tactic=tactic, dtype=torch.bfloat16, device="cuda")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("group,zero,perm,pqs", [(128, False, True, False), (64, True, False, False),
                                                 (32, False, True, False), (32, True, False, True),
                                                 (2048, False, False, False)])  # 2048: one group (per-channel)
@pytest.mark.parametrize("tactic", [TC, TC_SWAP, TC_K128, TC_256, TC_SPLIT, DEQUANT_MM],
                         ids=["tc", "tc_swap", "tc_k128", "tc_256", "tc_split2", "dequant_mm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w4a16_large_m_gptq_variants(group, zero, perm, pqs, tactic, dtype):
    tactic = fit_stages(tactic, group)  # the pipeline depth the build gives that group
    check_int4(257, 1024, 2048, group, zero=zero, pqs=pqs, perm=perm, tactic=tactic, dtype=dtype, device="cuda")


@pytest.mark.gpu
@cuda
def test_w4a16_large_m_autotune_candidates_and_graphs():
    """Every candidate the build times past 64 rows is correct on a Llama-8B shape; eager launches
    repeat their bytes and a CUDA graph replays them (split-K too); linear() runs the tactic the table names."""
    from trtc.compiler.autotune import gemm_candidates

    w = make_int4(4096, 4096, 128, True, True, False, 5, "cuda")
    x = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    key = gemm_key(w["weight"], w["weight_scale"])
    ref = w4a16_linear(x.float(), w["weight"], w["weight_scale"], w["weight_zero"],
                       w["pre_quant_scale"].to(torch.bfloat16).float(), bias=bias.float())
    candidates = gemm_candidates(key, 512, 4096)
    assert {t.impl for t in candidates} == {"dequant_mm", "triton_tc"} and len(candidates) >= 6
    for tactic in candidates:
        close(run_tactic(tactic, x, w, torch.bfloat16, bias), ref)
    for tactic in (TC, TC_SPLIT):  # split-K sums its partials in a fixed order, its counters reset themselves
        first = run_tactic(tactic, x, w, torch.bfloat16, bias)
        assert all(torch.equal(run_tactic(tactic, x, w, torch.bfloat16, bias), first) for _ in range(10))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run_tactic(tactic, x, w, torch.bfloat16, bias)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, first)
    layer = {f"q.{name}": t for name, t in w.items()} | {"q.bias": bias}
    tactics = TacticTable({key: {"512": {"impl": "triton_tc", "block_m": 64, "swap_ab": True}}})
    assert tactics.choose(key, 300) == Tactic("triton_tc", block_m=64, swap_ab=True)
    close(linear(x[:300], layer, "q", tactics=tactics), ref[:300])


def test_large_m_tactics():
    """Past 64 rows an untuned INT4 layer runs the tensor-core GEMM; the build times it against
    dequantize + cuBLAS; the launch arguments of each Triton impl are its own."""
    from trtc.compiler.autotune import gemm_candidates

    key = "w4a16:n4096:k4096:g128"
    assert default_tactic(key, 64).impl == "cuda" and default_tactic(key, 65).impl == "triton_tc"
    assert default_tactic(key, 256) == TC and default_tactic(key, 4096) == TC_256
    assert default_tactic("fp8:n4096:k4096", 256).impl == "scaled_mm"
    assert [t.impl for t in gemm_candidates(key, 128, 4096, packed=True)][:2] == ["dequant_mm", "triton_tc"]
    assert max(t.block_m for t in gemm_candidates(key, 100, 4096)) == 128
    assert max(t.block_m for t in gemm_candidates(key, 2048, 4096)) == 256
    assert TC_SWAP.launch_args()["swap_ab"] is True and TC_SPLIT.launch_args()["split_k"] == 2
    assert "swap_ab" not in Tactic("triton", split_k=2).launch_args()
    old_engine = TacticTable({key: {"512": {"impl": "dequant_mm", "block_m": 16, "block_n": 64, "block_k": 128,
                                            "split_k": 1, "num_warps": 4, "num_stages": 3}}})  # no swap_ab field
    assert old_engine.choose(key, 300) == DEQUANT_MM


def compile_for_hopper(kernel, signature: dict[str, str], constexprs: dict, num_warps: int, num_stages: int):
    """Triton's ahead-of-time compile of `kernel` for sm_90 (no GPU needed; its NVIDIA backend and ptxas)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**signature, **{name: "constexpr" for name in constexprs}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values())}  # as torch tensors and 16k sizes
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def sass_of(cubin: bytes, tmp_path) -> str | None:
    """The SASS of a cubin by the cuobjdump that comes with Triton (None without it)."""
    import subprocess
    from pathlib import Path

    import triton.backends.nvidia as nvidia

    tool = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    (tmp_path / "k.cubin").write_bytes(cubin)
    return subprocess.run([str(tool), "-sass", str(tmp_path / "k.cubin")], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.parametrize("dtype,group", [("bf16", 128), ("fp16", 128), ("bf16", 32)])
def test_large_m_candidates_compile_to_wgmma_for_hopper(dtype, group, tmp_path):
    """Every tile the build tries past 64 rows, and the untuned default, compiles for sm_90 on this
    machine, fits a Hopper block's 227 KiB of shared memory, spills no registers and runs on wgmma
    (Llama-8B's AWQ layer: group 128, zero points; GPTQ's group 32, where a K block spans groups and a
    stage takes more memory, and a tile may spill); so does the dequantization kernel of dequant_mm."""
    from trtc.compiler.autotune import gemm_candidates

    pytest.importorskip("triton.backends.nvidia.compiler")
    ptr = {"x_ptr": f"*{dtype}", "w_ptr": "*i32", "scale_ptr": "*fp32", "zero_ptr": "*u8", "pqs_ptr": "*fp32",
           "bias_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "part_ptr": "*fp32", "lock_ptr": "*i32"}
    ints = {name: "i32" for name in ("M", "N", "K", "stride_xm", "stride_w", "stride_sn", "stride_om")}
    key = f"w4a16:n4096:k4096:g{group}"
    tiles = {t for t in gemm_candidates(key, 1024, 4096) if t.impl == "triton_tc"} | {default_tactic(key, 1024, False)}
    assert len(tiles) >= 9
    for t in sorted(tiles, key=repr):
        consts = dict(GROUP=group, HAS_ZERO=True, HAS_PQS=False, HAS_BIAS=True, SWAP_AB=t.swap_ab, EVEN_K=True,
                      BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=w4a16_tc.GROUP_M,
                      SPLIT_K=t.split_k)
        k = compile_for_hopper(w4a16_tc._w4a16_tc_kernel, {**ptr, **ints}, consts, t.num_warps, t.num_stages)
        assert "wgmma.mma_async" in k.asm["ptx"] and k.metadata.shared <= 227 << 10, (t, k.metadata.shared)
        sass = sass_of(k.asm["cubin"], tmp_path)
        assert sass is None or "HGMMA" in sass, t
        if group >= t.block_k:  # no register spills (a K block over several groups may spill: the build times it)
            assert sass is None or "STL" not in sass, t
    sig = {"w_ptr": "*i32", "scale_ptr": "*fp32", "zero_ptr": "*u8", "pqs_ptr": "*fp32", "out_ptr": f"*{dtype}",
           **{name: "i32" for name in ("N", "K", "stride_w", "stride_sn", "stride_o")}}
    compile_for_hopper(w4a16_tc._dequant_kernel, sig, dict(GROUP=128, HAS_ZERO=True, HAS_PQS=True, EVEN_K=True,
                                                           BLOCK_N=64, BLOCK_K=128), 4, 1)


def _interpreter_cases() -> None:
    """Small cases on CPU tensors through Triton's interpreter (run with TRITON_INTERPRET=1). The
    interpreter's tl.dot is wrong for bf16 operands (it multiplies their bits), so its GEMMs run in
    fp16; the bf16 dequantization is checked alone, and the GPU tests cover bf16 GEMMs."""
    f16, bf16 = torch.float16, torch.bfloat16
    small = dict(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=2)
    # m, n, k, group, zero, pqs, perm, tactic, dtype: odd M, partial N tiles, K not a multiple of BLOCK_K
    for m, n, k, group, zero, pqs, perm, tactic, dtype in [
        (1, 40, 256, 128, True, True, False, Tactic("triton_tc", **small), f16),  # AWQ
        (33, 72, 512, 64, True, True, False, Tactic("triton_tc", **small, swap_ab=True), f16),
        (17, 48, 352, 32, False, False, True, Tactic("triton_tc", **small), f16),  # GPTQ act-order; K % 64 = 32
        (7, 64, 384, 128, False, False, False, Tactic("triton_tc", **{**small, "block_k": 128}, swap_ab=True), f16),
        (19, 40, 384, 192, True, True, True, Tactic("triton_tc", **{**small, "block_k": 128}), f16),  # group straddles
        (5, 40, 256, 256, False, True, False, Tactic("triton_tc", **small), f16),  # one group over K
        (21, 40, 352, 32, True, True, False, Tactic("triton_tc", **small, split_k=3), f16),  # split-K, K % 64 = 32
        (40, 72, 512, 128, False, False, True, Tactic("triton_tc", **small, split_k=2, swap_ab=True), f16),
    ]:
        check_int4(m, n, k, group, zero, pqs, perm, tactic, dtype, "cpu", seed=m)
    for group, zero, pqs in [(128, True, True), (32, False, False), (64, True, False)]:
        for dtype in (f16, bf16):
            check_dequantize(72, 320, group, zero, pqs, dtype, "cpu", seed=group)
        w = make_int4(40, 256, group, zero, pqs, True, group, "cpu")
        x = torch.randn(9, 256, generator=torch.Generator().manual_seed(group)).to(f16)
        ref = w4a16_linear(x.float(), w["weight"], w["weight_scale"], w.get("weight_zero"),
                           w["pre_quant_scale"].to(f16).float() if pqs else None, w["input_perm"])
        close(w4a16_tc.dequant_mm(x, w["weight"], w["weight_scale"], w.get("weight_zero"), w.get("pre_quant_scale"),
                                  w["input_perm"]), ref)
    bias = torch.randn(40).to(f16)
    w = make_int4(40, 256, 64, True, False, False, 3, "cpu")
    x = torch.randn(5, 256).to(f16)
    ref = w4a16_linear(x.float(), w["weight"], w["weight_scale"], w["weight_zero"], bias=bias.float())
    close(run_tactic(Tactic("triton_tc", **small), x, w, f16, bias), ref)


def test_interpreter_small():
    from triton_interpreter import run_under_interpreter  # tests/ is on the path under pytest only

    run_under_interpreter(__file__)


if __name__ == "__main__":
    _interpreter_cases()
    print("interpreter cases passed")
