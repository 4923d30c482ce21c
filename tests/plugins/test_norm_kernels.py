"""The fused residual-add + RMSNorm kernel (Triton) against the reference, on fresh random inputs.

Outputs are NaN-poisoned before each run (the caching allocator hands the poisoned block back).
Tolerances: new_residual bit-exact (the same add in the activation dtype); normed within
rtol 1.6e-2 (bf16) / 2e-3 (fp16), atol 1e-5, with >= 99% of elements bit-exact (float32 math as the
reference; only the order of the sum of squares differs). `test_interpreter_small` runs the kernel
on CPU through Triton's interpreter (fp16: the interpreter rounds bf16 differently).
"""

from __future__ import annotations

import pytest
import torch

from trtc.plugins.norm import fused_add_rms_norm, reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
RTOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _poison_allocator(shape, dtype, device, n=4) -> None:
    if device != "cpu":
        for _ in range(n):
            torch.full(shape, float("nan"), dtype=dtype, device=device)


def check_norm(t, hidden, dtype, device, seed, with_residual=True, offset=0.0):
    from trtc.plugins.norm.triton import fused_add_rms_norm as kernel

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(t, hidden, generator=g) * 3).to(device, dtype)
    res = (torch.randn(t, hidden, generator=g) * 3).to(device, dtype) if with_residual else None
    w = (torch.rand(hidden, generator=g) + 0.5).to(device, dtype)
    _poison_allocator((t, hidden), dtype, device)
    normed, new_res = kernel(x, res, w, 1e-5, offset)
    ref_normed, ref_res = reference.fused_add_rms_norm(x, res, w, 1e-5, offset)
    assert torch.isfinite(normed).all() and torch.isfinite(new_res).all()
    assert torch.equal(new_res, ref_res)
    torch.testing.assert_close(normed, ref_normed, rtol=RTOL[dtype], atol=1e-5)
    exact = (normed == ref_normed).float().mean().item()
    assert exact >= 0.99, exact


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("t,hidden", [(1, 4096), (256, 4096), (2048, 4096), (37, 5120), (3, 100), (5, 8192)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_add_rms_norm(t, hidden, dtype):
    check_norm(t, hidden, dtype, "cuda", seed=t * hidden)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("with_residual,offset", [(False, 0.0), (True, 1.0), (False, 1.0)])
def test_no_residual_and_offset(with_residual, offset):
    check_norm(17, 4096, torch.bfloat16, "cuda", seed=1, with_residual=with_residual, offset=offset)


@pytest.mark.gpu
@cuda
def test_dispatch_picks_kernel_on_cuda():
    x, w = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16), torch.rand(4096, device="cuda").bfloat16()
    normed, new_res = fused_add_rms_norm(x, x, w, 1e-6)
    ref_normed, ref_res = reference.fused_add_rms_norm(x, x, w, 1e-6)
    torch.testing.assert_close(normed, ref_normed)
    assert torch.equal(new_res, ref_res)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("head_dim,offset", [(128, 0.0), (256, 1.0)])
def test_rms_norm_of_strided_heads(head_dim, offset):
    """q/k norms: `rms_norm` on the q heads of a fused qkv output (rows strided by the qkv width)
    runs the kernel and equals the reference."""
    from trtc.plugins.norm import rms_norm

    g = torch.Generator().manual_seed(head_dim)
    qkv = (torch.randn(37, 12 * head_dim, generator=g) * 3).to("cuda", torch.bfloat16)
    q = qkv[:, : 8 * head_dim].view(37, 8, head_dim)  # [T, Hq, D], row stride 12 * D
    w = (torch.rand(head_dim, generator=g) + 0.5).to("cuda", torch.bfloat16)
    _poison_allocator((37 * 8, head_dim), torch.bfloat16, "cuda")
    out = rms_norm(q, w, 1e-6, offset)
    ref = reference.rms_norm(q, w, 1e-6, offset)
    assert out.shape == q.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=RTOL[torch.bfloat16], atol=1e-5)
    assert (out == ref).float().mean().item() >= 0.99


def test_dispatch_uses_reference_on_cpu():
    x, r, w = torch.randn(3, 64), torch.randn(3, 64), torch.randn(64)
    normed, new_res = fused_add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(new_res, x + r) and torch.equal(normed, reference.rms_norm(x + r, w, 1e-6))
    normed, same = fused_add_rms_norm(x, None, w, 1e-6)
    assert same is x and torch.equal(normed, reference.rms_norm(x, w, 1e-6))
    from trtc.plugins.norm import rms_norm

    assert torch.equal(rms_norm(x, w, 1e-6, 1.0), reference.rms_norm(x, w, 1e-6, 1.0))


def test_interpreter_small():
    from triton_interpreter import run_under_interpreter  # tests/ is on the path under pytest only

    run_under_interpreter(__file__)


if __name__ == "__main__":  # under TRITON_INTERPRET=1, on CPU tensors
    check_norm(5, 300, torch.float16, "cpu", seed=0)
    check_norm(2, 256, torch.float16, "cpu", seed=1, with_residual=False, offset=1.0)
    print("interpreter cases passed")
