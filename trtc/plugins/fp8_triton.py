"""FP8 (float8_e4m3fn) quantization inside trtc's Triton kernels, as `quantize_fp8` does it
(trtc/formats/quant_layout.py): float32 division by the scale, saturated to the format's range,
since the cast itself does not saturate."""

from __future__ import annotations

import triton
import triton.language as tl

from trtc.formats.quant_layout import FP8_MAX

_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def fp8_saturate(x, scale):
    """x / scale in float32, clamped to +-448; the caller's cast to float8_e4m3fn rounds it."""
    return tl.minimum(tl.maximum(x.to(tl.float32) / scale, -_FP8_MAX), _FP8_MAX)
