"""The quantized GEMM kernels (CUDA C++ and Triton W4A16, Triton and cuBLASLt FP8) and the FP8 activation
quantization fused into the norm and SwiGLU kernels, against their references on fresh random inputs.

Tolerances: GEMM outputs within max|y - ref| <= 1e-2 * max|ref| of the reference evaluated in float32
on the same quantized operands (the bf16 references round the dequantized weight to bf16; the
kernels do not). FP8 activations: the fused kernels' bytes equal quantize_fp8 of the unfused
output (on CUDA; >= 90% under Triton's CPU interpreter, whose fp8 rounding is wrong at powers of
two). `test_interpreter_small` runs small cases on the CPU through Triton's interpreter.
"""

from __future__ import annotations

import pytest
import torch

from trtc.formats.quant_layout import pack_int4, quantize_fp8
from trtc.plugins.gemm import linear, w4a16_packed
from trtc.plugins.gemm.fp8 import fp8_linear
from trtc.plugins.gemm.linear import run_tactic
from trtc.plugins.gemm.tactics import Tactic, TacticTable, default_tactic, gemm_key
from trtc.plugins.gemm.w4a16 import w4a16_linear
from trtc.plugins.gemm.w4a16_packed import pack, pack_layer, unpack

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_int4(n, k, group, zero, pqs, perm, seed, device):
    g = torch.Generator().manual_seed(seed)
    w = {"weight": pack_int4(torch.randint(0, 16, (n, k), generator=g)),
         "weight_scale": torch.rand(n, k // group, generator=g) * 0.02 + 0.002}
    if zero:
        w["weight_zero"] = torch.randint(0, 16, (n, k // group), generator=g, dtype=torch.uint8)
    if pqs:
        w["pre_quant_scale"] = torch.rand(k, generator=g) + 0.5
    if perm:
        w["input_perm"] = torch.randperm(k, generator=g).to(torch.int32)
    return {name: t.to(device) for name, t in w.items()}


def make_fp8(n, k, per_channel, seed, device):
    g = torch.Generator().manual_seed(seed)
    ws = torch.rand(n, generator=g) * 0.01 + 0.002 if per_channel else torch.tensor(0.005)
    w = {"weight": quantize_fp8(torch.randn(n, k, generator=g), torch.tensor(0.01)),
         "weight_scale": ws, "input_scale": torch.tensor(0.02)}
    return {name: t.to(device) for name, t in w.items()}


def close(y: torch.Tensor, ref: torch.Tensor, tol: float = 1e-2) -> None:
    assert torch.isfinite(y).all()
    err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err <= tol, err


def check_int4(m, n, k, group, zero, pqs, perm, tactic, dtype, device, seed=0):
    w = make_int4(n, k, group, zero, pqs, perm, seed, device)
    if tactic.impl == "cuda":
        assert pack_layer(w, dtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    y = run_tactic(tactic, x, w, dtype)
    pqs_rounded = w["pre_quant_scale"].to(dtype).float() if pqs else None  # as the bf16 reference rounds it
    ref = w4a16_linear(x.float(), w["weight"], w["weight_scale"], w.get("weight_zero"), pqs_rounded, w.get("input_perm"))
    close(y, ref)


def check_fp8(m, n, k, per_channel, tactic, dtype, device, seed=0):
    w = make_fp8(n, k, per_channel, seed, device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    y = run_tactic(tactic, quantize_fp8(x, w["input_scale"]), w, dtype)
    close(y, fp8_linear(x.float(), w["weight"], w["weight_scale"], w["input_scale"]))


SMALL = Tactic("triton", block_m=16, block_n=64, block_k=128, split_k=1)
SPLIT = Tactic("triton", block_m=16, block_n=32, block_k=128, split_k=4)
WIDE = Tactic("triton", block_m=64, block_n=128, block_k=128, num_warps=8)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("m", [1, 5, 16, 33, 300])
@pytest.mark.parametrize("tactic", [SMALL, SPLIT, WIDE], ids=["small", "split4", "wide"])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (200, 384)])  # 200: a partial tile of N
def test_w4a16_awq_shapes(m, tactic, n, k):
    check_int4(m, n, k, 128, zero=False, pqs=True, perm=False, tactic=tactic, dtype=torch.bfloat16, device="cuda")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("group,zero,perm", [(128, True, True), (64, True, False), (32, False, True), (128, False, True)])
@pytest.mark.parametrize("tactic", [SMALL, SPLIT], ids=["small", "split4"])
def test_w4a16_gptq_variants(group, zero, perm, tactic):
    check_int4(7, 1024, 2048, group, zero=zero, pqs=False, perm=perm, tactic=tactic, dtype=torch.bfloat16, device="cuda")


def cuda_tactic(m: int, n_groups: int) -> Tactic:
    return Tactic("cuda", block_n=w4a16_packed.block_n(m, n_groups))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 17, 33, 64])
@pytest.mark.parametrize("n_groups", [1, 2, 4])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (208, 384)])  # 208: 13 n-tiles, a partial block
def test_w4a16_cuda_kernel_awq_shapes(m, n_groups, n, k):
    check_int4(m, n, k, 128, zero=False, pqs=True, perm=False, tactic=cuda_tactic(m, n_groups), dtype=torch.bfloat16,
               device="cuda")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("group,zero,perm,pqs", [(128, True, True, False), (64, True, False, False), (256, False, True, True),
                                                 (128, False, False, False), (512, True, False, True),
                                                 (3072, False, False, False)])  # 3072: one group (per-channel)
@pytest.mark.parametrize("m", [5, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w4a16_cuda_kernel_variants(group, zero, perm, pqs, m, dtype):
    check_int4(m, 1024, 3072, group, zero=zero, pqs=pqs, perm=perm, tactic=cuda_tactic(m, 2), dtype=dtype, device="cuda")


@pytest.mark.gpu
@cuda
def test_w4a16_cuda_kernel_bias_graphs_and_determinism():
    """Bias is added once; a CUDA graph replays the same bytes as eager launches, which repeat exactly."""
    w = make_int4(4096, 4096, 128, True, True, False, 5, "cuda")
    assert pack_layer(w, torch.bfloat16)
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    tactic = cuda_tactic(4, 1)
    first = run_tactic(tactic, x, w, torch.bfloat16, bias)
    ref = w4a16_linear(x.float(), w["weight"], w["weight_scale"], w["weight_zero"],
                       w["pre_quant_scale"].to(torch.bfloat16).float(), bias=bias.float())
    close(first, ref)
    assert all(torch.equal(run_tactic(tactic, x, w, torch.bfloat16, bias), first) for _ in range(10))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_tactic(tactic, x, w, torch.bfloat16, bias)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, first)


@pytest.mark.parametrize("n,k,group", [(16, 64, 64), (48, 384, 128), (32, 512, 256)])
def test_w4a16_packed_layout_is_what_the_kernel_reads(n, k, group):
    """`unpack` reads the packed words by the kernel's register rules: it must give back the weight,
    and the scale / zero pairs must be rows (g, g + 8) of each 16-row tile, in the model dtype."""
    w = make_int4(n, k, group, True, True, False, n + k, "cpu")
    from trtc.formats.quant_layout import unpack_int4

    p = pack(w["weight"], w["weight_scale"], w["weight_zero"], w["pre_quant_scale"], None, torch.bfloat16)
    assert p["packed_weight"].shape == (n // 16, k // 64, 32, 4) and p["packed_weight"].dtype == torch.int32
    assert torch.equal(unpack(p["packed_weight"]), unpack_int4(w["weight"]))
    scale = p["packed_scale"].view(torch.bfloat16).view(n // 16, k // group, 8, 2)  # [nt, q, g, h]
    zero = p["packed_zero"].view(torch.bfloat16).view(n // 16, k // group, 8, 2)
    for nt, q, g, h in [(0, 0, 0, 0), (n // 16 - 1, k // group - 1, 7, 1), (0, k // group - 1, 3, 1)]:
        row = 16 * nt + 8 * h + g
        assert scale[nt, q, g, h] == w["weight_scale"][row, q].to(torch.bfloat16)
        assert zero[nt, q, g, h] == -(128 + w["weight_zero"][row, q].float())
    assert torch.equal(p["packed_pqs"], w["pre_quant_scale"].to(torch.bfloat16))
    assert "packed_pqs" not in pack(w["weight"], w["weight_scale"], None, w["pre_quant_scale"],
                                    torch.arange(k, dtype=torch.int32), torch.float16)


def test_w4a16_cuda_kernel_groups():
    """The kernel takes groups of 64 x 2^i columns (its GS), or one group over K, and K in steps of 128
    columns; other layers go to Triton."""
    assert [w4a16_packed.group_shift(4096, g) for g in (64, 128, 256, 4096)] == [0, 1, 2, 6]
    assert w4a16_packed.group_shift(14336, 14336) == 31
    assert w4a16_packed.supports(4096, 14336, 14336) and w4a16_packed.supports(4096, 4096, 128)
    assert not w4a16_packed.supports(4096, 3072, 192) and not w4a16_packed.supports(4096, 4096, 32)
    assert not w4a16_packed.supports(4096, 4160, 64)


def test_w4a16_cuda_kernel_instances_and_shared_memory():
    """Each M up to MAX_M has its instantiation (w4a16_gemv's rows a power of two >= M), and the
    dynamic shared memory the launcher asks for stays under the 227 KiB a Hopper or Ampere block may have."""
    assert [w4a16_packed.gemv_rows(m) for m in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    names = set(w4a16_packed._module().names)
    for m in range(1, w4a16_packed.MAX_M + 1):
        for r in w4a16_packed.BLOCK_GROUPS:
            assert w4a16_packed._kernel(True, m, r, True) in names
        for pqs in (False, True):
            assert 0 < w4a16_packed.shared_bytes(m, pqs) <= 227 << 10
    assert w4a16_packed.shared_bytes(1, True) == 8 * 4 * (1152 + 272 + 256)


def test_decode_reads_only_the_packed_copy_of_an_int4_layer():
    """The MBU of `trtc bench --latency` counts what a decode step reads: a packed INT4 layer's
    PACKED_TENSORS, not also the checkpoint layout kept beside them."""
    w = make_int4(64, 256, 128, zero=True, pqs=True, perm=False, seed=0, device="cpu")
    layer = {f"l.{n}": t for n, t in w.items()}
    assert not w4a16_packed.decode_unread(layer)
    assert pack_layer(w, torch.bfloat16)
    both = {**{f"l.{n}": t for n, t in w.items()}, "m.weight": torch.zeros(4, 4)}
    assert w4a16_packed.decode_unread(both) == {"l.weight", "l.weight_scale", "l.weight_zero", "l.pre_quant_scale"}


def test_w4a16_cuda_source_compiles_with_nvrtc():
    """The kernel source compiles for Ampere and Hopper and every instantiation the launcher names
    exists (skipped without NVRTC: it comes with PyTorch's CUDA builds)."""
    from trtc.errors import TrtcError
    from trtc.plugins import cuda_jit
    from trtc.plugins.gemm import w4a16_packed

    try:
        cuda_jit._nvrtc()
    except TrtcError:
        pytest.skip("NVRTC is absent")
    names = w4a16_packed._module().names
    for arch in ("80", "90"):
        cubin, lowered = cuda_jit.compile_cubin(w4a16_packed.SOURCE.read_text(), names, arch)
        assert cubin[:4] == b"\x7fELF" and set(lowered) == set(names)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("m", [1, 16, 64, 1000])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("tactic", [Tactic("scaled_mm"), SMALL, SPLIT, Tactic("triton", block_m=64, block_k=256)],
                         ids=["scaled_mm", "small", "split4", "k256"])
def test_fp8_gemm(m, per_channel, tactic):
    check_fp8(m, 6144, 4096, per_channel, tactic, torch.bfloat16, "cuda")


@pytest.mark.gpu
@cuda
def test_split_k_is_deterministic_and_reusable():
    """The split-K counters reset themselves: many launches, including under a CUDA graph, give the same bytes."""
    from trtc.plugins.gemm.triton_quant import launch, split_k_locks

    w = make_int4(4096, 4096, 128, False, True, False, 0, "cuda")
    x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
    split_k_locks(x.device)
    run = lambda: launch(x, w["weight"], w["weight_scale"], out_dtype=torch.bfloat16,  # noqa: E731
                         pre_quant_scale=w["pre_quant_scale"], **SPLIT.launch_args())
    first = run()
    assert all(torch.equal(run(), first) for _ in range(20))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first)


@pytest.mark.gpu
@cuda
def test_linear_dispatch_runs_the_given_tactic():
    w = {f"q.{k}": v for k, v in make_int4(512, 1024, 128, True, False, False, 3, "cuda").items()}
    x = torch.randn(2, 1024, device="cuda", dtype=torch.bfloat16)
    ref = w4a16_linear(x.float(), w["q.weight"], w["q.weight_scale"], w["q.weight_zero"])
    key = gemm_key(w["q.weight"], w["q.weight_scale"])
    for split in (1, 4):
        tactics = TacticTable({key: {"1": {"impl": "triton", "block_n": 32, "split_k": split}}})
        assert tactics.choose(key, 2).split_k == split
        close(linear(x, w, "q", tactics=tactics), ref)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("t,hidden", [(1, 4096), (77, 4096), (5, 1000)])
def test_fused_fp8_activation_quantization(t, hidden):
    check_fused_quant(t, hidden, torch.bfloat16, "cuda")


def check_fused_quant(t, hidden, dtype, device):
    from trtc.plugins.activation import reference as act_ref
    from trtc.plugins.activation.triton import silu_and_mul
    from trtc.plugins.gemm.act_quant import quantize_activation
    from trtc.plugins.norm import reference as norm_ref
    from trtc.plugins.norm.triton import fused_add_rms_norm

    g = torch.Generator().manual_seed(t)
    x, r = ((torch.randn(t, hidden, generator=g) * 2).to(device, dtype) for _ in range(2))
    w = (torch.rand(hidden, generator=g) + 0.5).to(device, dtype)
    scale = torch.tensor(0.01, device=device)
    need = 1.0 if device != "cpu" else 0.9

    def same(a, b):
        assert a.dtype == torch.float8_e4m3fn and (a.view(torch.uint8) == b.view(torch.uint8)).float().mean() >= need

    normed8, new_res = fused_add_rms_norm(x, r, w, 1e-5, 0.0, scale)
    normed, ref_res = fused_add_rms_norm(x, r, w, 1e-5, 0.0)
    assert torch.equal(new_res, ref_res)
    same(normed8, quantize_fp8(normed, scale))
    if device == "cuda":  # the unfused kernel itself matches the reference norm (test_norm_kernels.py)
        torch.testing.assert_close(normed, norm_ref.fused_add_rms_norm(x, r, w, 1e-5)[0], rtol=1.6e-2, atol=1e-5)
    gate_up = torch.cat([x, r], dim=-1)
    same(silu_and_mul(gate_up, scale), quantize_fp8(act_ref.silu_and_mul(gate_up), scale))
    same(quantize_activation(x, scale), quantize_fp8(x, scale))


def test_tactic_table_and_defaults():
    assert gemm_key(torch.zeros(64, 128, dtype=torch.uint8), torch.zeros(64, 2)) == "w4a16:n64:k256:g128"
    assert gemm_key(torch.zeros(8, 32, dtype=torch.float8_e4m3fn), torch.zeros(())) == "fp8:n8:k32"
    assert default_tactic("fp8:n8:k32", 1000).impl == "scaled_mm"
    assert default_tactic("w4a16:n64:k256:g128", 1) == Tactic("cuda", block_n=16)
    assert default_tactic("w4a16:n64:k256:g128", 1, packed=False).impl == "triton"
    assert default_tactic("w4a16:n64:k256:g128", 4096).impl == "triton_tc"
    tactics = TacticTable({"w4a16:n7:k256:g128": {"1": {"impl": "triton", "split_k": 8},
                                                  "16": {"impl": "triton", "block_n": 128, "split_k": 2}}})
    assert tactics.choose("w4a16:n7:k256:g128", 1).split_k == 8
    assert tactics.choose("w4a16:n7:k256:g128", 3) == Tactic("triton", block_n=128, split_k=2)
    assert tactics.choose("w4a16:n7:k256:g128", 5000) == Tactic("triton", block_n=128, split_k=2)
    assert tactics.choose("w4a16:n8:k256:g128", 5) == default_tactic("w4a16:n8:k256:g128", 5)
    assert TacticTable().choose("w4a16:n7:k256:g128", 1) == default_tactic("w4a16:n7:k256:g128", 1)


def _interpreter_cases() -> None:
    """Small cases on CPU tensors through Triton's interpreter (run with TRITON_INTERPRET=1)."""
    f16 = torch.float16
    for m, group, zero, pqs, perm, tactic in [
        (3, 128, False, True, False, SMALL), (17, 64, True, False, True, SPLIT), (2, 32, False, True, True, SMALL),
        (5, 128, True, True, True, Tactic("triton", block_m=32, block_n=32, block_k=64, split_k=3)),
    ]:
        check_int4(m, 72, 512, group, zero, pqs, perm, tactic, f16, "cpu", seed=m)
    for per_channel, tactic in [(False, SMALL), (True, SPLIT)]:
        check_fp8(5, 40, 512, per_channel, tactic, f16, "cpu")
    check_fused_quant(3, 200, f16, "cpu")


def test_interpreter_small():
    from triton_interpreter import run_under_interpreter  # tests/ is on the path under pytest only

    run_under_interpreter(__file__)


if __name__ == "__main__":
    _interpreter_cases()
    print("interpreter cases passed")
