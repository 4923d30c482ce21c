"""`trtc quantize` through ModelOpt (FP8, INT4 AWQ) on every architecture beyond the Llama family:
the converted checkpoint's reference forward reproduces ModelOpt's fake-quantized model, with the
tolerances of tests/test_quantize.py (INT4 to float32 rounding; FP8 within a tenth of the
quantization error, the same greedy tokens almost everywhere)."""

from __future__ import annotations

import pytest
import torch
from models import load_hf, make_hf_model
from oracles.reference import ReferenceModel
from test_quantize import GROUP, rel, resmooth

from trtc.converters.convert import convert
from trtc.quantization.quantize import calibrate, export

ARCHS = ["gemma2", "phi3", "gemma3", "nemotron", "exaone4"]
TINY = dict(hidden_size=128, intermediate_size=256)  # 4 heads of 32: in-features are multiples of GROUP
PHI3_ROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
             "short_factor": [1.0 + i / 8 for i in range(8)], "long_factor": [2.0 + i for i in range(8)]}
OVERRIDES = {"gemma2": dict(head_dim=32), "gemma3": dict(head_dim=32), "phi3": dict(rope_parameters=PHI3_ROPE)}


# q/k-norm models under FP8: every linear differs from ModelOpt's by ~4% on ModelOpt's own inputs
# (2e-3 on the Llama family): a known gap, not yet understood
QK_NORM_FP8 = pytest.mark.xfail(strict=True, reason="FP8 per-linear mismatch with ModelOpt on q/k-norm models")
CASES = [pytest.param(a, q, marks=QK_NORM_FP8 if q == "fp8" and a in ("gemma3", "exaone4") else ())
         for a in ARCHS for q in ("fp8", "int4_awq")]


@pytest.mark.parametrize(("arch", "qformat"), CASES)
def test_reference_matches_modelopt_fake_quant(arch, qformat, tmp_path):
    hf = make_hf_model(tmp_path / "hf", arch, **TINY, **OVERRIDES.get(arch, {}))
    g = torch.Generator().manual_seed(0)
    calib = [torch.cat([torch.ones(4, 1, dtype=torch.long), torch.randint(3, 131, (4, 31), generator=g)], 1)]
    prompt = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.randint(3, 131, (2, 20), generator=g)], 1)
    model = load_hf(hf)
    with torch.no_grad():
        base = model(prompt).logits
    calibrate(model, qformat, calib, False, GROUP, "lite")
    resmooth(model)
    with torch.no_grad():
        fake = model(prompt).logits
    export(model, tmp_path / "q")
    ckpt = convert(tmp_path / "q", tmp_path / "ckpt", progress=False)
    ref = ReferenceModel.from_checkpoint(ckpt)
    got = ref.forward(prompt, ref.new_cache())
    quant_error = rel(fake, base)
    assert quant_error > 0.01  # quantization changed the model (the comparison below means something)
    if qformat == "int4_awq":
        assert rel(got, fake) < 1e-5
    else:
        assert rel(got, fake) < 0.1 * quant_error
        assert float((got.argmax(-1) == fake.argmax(-1)).float().mean()) >= 0.9
