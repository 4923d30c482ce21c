"""The quantized GEMM references against plain float arithmetic written out here."""

from __future__ import annotations

import torch

from trtc.formats.quant_layout import pack_int4, quantize_fp8, unpack_int4
from trtc.plugins.gemm import linear
from trtc.plugins.gemm.fp8 import fp8_linear
from trtc.plugins.gemm.w4a16 import dequantize_int4, w4a16_linear

G = torch.Generator().manual_seed(0)


def test_int4_packing_round_trip_and_nibble_order():
    u = torch.randint(0, 16, (6, 10), generator=G)
    packed = pack_int4(u)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 5)
    assert torch.equal(unpack_int4(packed).long(), u)
    assert int(packed[0, 0]) == int(u[0, 0]) | (int(u[0, 1]) << 4)  # low nibble = even column


def test_w4a16_equals_float_gemm_on_the_dequantized_weight():
    out, inp, group = 12, 64, 16
    u = torch.randint(0, 16, (out, inp), generator=G)
    scale = torch.rand(out, inp // group, generator=G) + 0.1
    zero = torch.randint(0, 16, (out, inp // group), generator=G).to(torch.uint8)
    pqs = torch.rand(inp, generator=G) + 0.5
    perm = torch.randperm(inp, generator=G).to(torch.int32)
    x = torch.randn(3, 5, inp, generator=G)
    s, z = scale.repeat_interleave(group, 1), zero.float().repeat_interleave(group, 1)
    w = (u - z) * s
    assert torch.allclose(dequantize_int4(pack_int4(u), scale, zero, torch.float32), w)
    want = ((x * pqs)[..., perm.long()]) @ w.T
    got = w4a16_linear(x, pack_int4(u), scale, zero, pqs, perm)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
    # symmetric: zero point 8; and `linear` picks W4A16 from the layer's tensors
    weights = {"l.weight": pack_int4(u), "l.weight_scale": scale, "l.bias": torch.ones(out)}
    assert torch.allclose(linear(x, weights, "l"), x @ ((u - 8) * s).T + 1, rtol=1e-5, atol=1e-4)


def test_fp8_gemm_emulates_the_scaled_kernel():
    x = torch.randn(7, 32, generator=G) * 3
    w = torch.randn(16, 32, generator=G) * 0.05
    x_scale, w_scale = x.abs().max() / 448, w.abs().max() / 448
    wq = quantize_fp8(w, w_scale)
    assert wq.dtype == torch.float8_e4m3fn
    xq = (x / x_scale).to(torch.float8_e4m3fn)
    want = (xq.float() @ wq.float().T) * (x_scale * w_scale)
    got = linear(x, {"l.weight": wq, "l.weight_scale": w_scale, "l.input_scale": x_scale}, "l")
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert float((got - x @ w.T).abs().max() / (x @ w.T).abs().max()) < 0.1  # FP8 is close to the float GEMM
    # activations beyond the calibrated range saturate at +-448 instead of becoming NaN
    big = fp8_linear(x * 100, wq, w_scale, x_scale)
    assert torch.isfinite(big).all()
    # a fused layer's per-row weight scale
    rows = torch.cat([w_scale.expand(8), (2 * w_scale).expand(8)])
    fused = fp8_linear(x, wq, rows, x_scale)
    single = fp8_linear(x, wq, w_scale, x_scale)
    assert torch.allclose(fused[:, :8], single[:, :8]) and torch.allclose(fused[:, 8:], 2 * single[:, 8:], rtol=1e-6)
