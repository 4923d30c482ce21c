"""`trtc quantize` through ModelOpt (FP8, INT4 AWQ) on every architecture beyond the Llama family:
the converted checkpoint's reference forward, and the engine built from it and run on the CPU,
reproduce ModelOpt's fake-quantized model, with the tolerances of tests/test_quantize.py (INT4 to
float32 rounding; FP8 within a tenth of the quantization error, the same greedy tokens almost
everywhere).

FP8 is compared with ModelOpt's model evaluated in the FP8 GEMM's order (test_quantize.fp8_gemm_order):
ModelOpt's own order differs by float32 rounding per linear (checked here, < 2e-3 as in
test_quantize), which FP8 rounding in later layers can magnify to a few percent of the logits on
some random models (Gemma 3 and EXAONE 4 here: 4.6e-2 and 1.9e-2), so the end-to-end comparison is
made where both sides compute the same float32 operations.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from models import load_hf, make_hf_model
from oracles.reference import ReferenceModel
from test_quantize import GROUP, fp8_gemm_order, rel, resmooth

from trtc.compiler.build import build
from trtc.converters.convert import convert
from trtc.formats.build_config import BuildConfig
from trtc.llm import LLM
from trtc.quantization.quantize import calibrate, export
from trtc.runtime.sampling_params import SamplingParams

ARCHS = ["gemma2", "phi3", "gemma3", "nemotron", "exaone4"]
TINY = dict(hidden_size=128, intermediate_size=256)  # 4 heads of 32: in-features are multiples of GROUP
PHI3_ROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
             "short_factor": [1.0 + i / 8 for i in range(8)], "long_factor": [2.0 + i for i in range(8)]}
OVERRIDES = {"gemma2": dict(head_dim=32), "gemma3": dict(head_dim=32), "phi3": dict(rope_parameters=PHI3_ROPE)}
NEW_TOKENS = 16


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """The fraction of positions where the two logits pick the same token."""
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


@pytest.mark.parametrize("qformat", ["fp8", "int4_awq"])
@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_and_engine_match_modelopt_fake_quant(arch, qformat, tmp_path):
    hf = make_hf_model(tmp_path / "hf", arch, **TINY, **OVERRIDES.get(arch, {}))
    g = torch.Generator().manual_seed(0)
    calib = [torch.cat([torch.ones(4, 1, dtype=torch.long), torch.randint(3, 131, (4, 31), generator=g)], 1)]
    prompt = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.randint(3, 131, (2, 20), generator=g)], 1)
    model = load_hf(hf)
    with torch.no_grad():
        base = model(prompt).logits
    calibrate(model, qformat, calib, False, GROUP, "lite")
    resmooth(model)
    # ModelOpt's fake-quantized model as it computes, and (FP8) in the FP8 GEMM's order: the oracle
    order = fp8_gemm_order(model) if qformat == "fp8" else contextlib.nullcontext({})
    with torch.no_grad():
        fake = model(prompt).logits
        with order as gaps:
            oracle = model(prompt).logits
            greedy = model.generate(prompt[:1], max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, prompt.shape[1]:].tolist()
    export(model, tmp_path / "q")
    ckpt = convert(tmp_path / "q", tmp_path / "ckpt", progress=False)
    ref = ReferenceModel.from_checkpoint(ckpt)
    got = ref.forward(prompt, ref.new_cache())
    quant_error = rel(fake, base)
    assert quant_error > 0.01  # quantization changed the model (the comparisons below mean something)
    assert agreement(got, fake) >= 0.9  # ModelOpt's own arithmetic
    if qformat == "int4_awq":
        assert rel(got, fake) < 1e-5
    else:
        assert gaps and max(gaps.values()) < 2e-3, gaps  # each linear: ModelOpt's order vs the GEMM's
        assert rel(got, oracle) < 0.1 * quant_error

    # the engine: built from the checkpoint, run on the CPU (paged KV cache, chunked prefill, fused qkv)
    engine = build(ckpt, tmp_path / "engine", BuildConfig(tokens_per_block=4, max_num_tokens=16, max_seq_len=128),
                   progress=False)
    with LLM(engine, kv_cache_max_tokens=256) as llm:
        logits = torch.stack(llm.executor.prompt_logits(prompt.tolist()))  # [2, 21, vocab]
        out = llm.generate([prompt[0].tolist()], SamplingParams(max_tokens=NEW_TOKENS, end_id=-1))
    assert rel(logits, oracle) < (1e-4 if qformat == "int4_awq" else 0.1 * quant_error)
    assert agreement(logits, oracle) >= 0.9
    assert out[0].token_ids == greedy
