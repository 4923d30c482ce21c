"""The reference forward equals HF transformers (float32) on every converted architecture, and its
tensor-parallel shards reproduce tp 1."""

from __future__ import annotations

import pytest
import torch
from models import CASES, load_hf, make_hf_model
from oracles.reference import ReferenceModel

from trtc.converters.convert import convert

# relative error: max |trtc - hf| / max |hf| over the logits of one step
REL_TOL = 1e-4
DECODE_STEPS = 16
PROMPT_LEN = 11  # longer than the sliding windows of the mistral/qwen2 cases


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {case: make_hf_model(root / case, case) for case in CASES}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def hf_steps(model, prompt: torch.Tensor, steps: int):
    """HF logits for the prompt, then for `steps` greedy decode steps with its KV cache."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        logits, tokens, past = [out.logits], [], out.past_key_values
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
            out = model(token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits.append(out.logits)
    return logits, tokens


def assert_follows_hf(ref, hf, prompt: torch.Tensor) -> None:
    """The oracle forward's logits equal HF's (REL_TOL) on the prompt and DECODE_STEPS greedy steps."""
    hf_logits, tokens = hf_steps(hf, prompt, DECODE_STEPS)
    cache = ref.new_cache()
    errors = [rel_err(ref.forward(prompt, cache), hf_logits[0])]
    for step, token in enumerate(tokens):
        errors.append(rel_err(ref.forward(token, cache), hf_logits[step + 1]))
    assert max(errors) < REL_TOL, f"relative errors per step: {errors}"


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_decode_match_hf(case, hf_models, tmp_path):
    check_prefill_and_decode(hf_models[case], tmp_path)


def test_longrope_switches_to_long_factors_mid_decode(tmp_path):
    """The prompt is within the original context (short factors), decoding passes it (long factors;
    keys cached before keep their rotation, as in HF's forward with a cache). HF's `generate`
    recomputes those keys instead, and so does the runtime: tests/test_longrope.py."""
    params = {**CASES["phi3"][1]["rope_parameters"], "original_max_position_embeddings": PROMPT_LEN + 4}
    hf_dir = make_hf_model(tmp_path / "hf", "phi3", original_max_position_embeddings=PROMPT_LEN + 4,
                           rope_parameters=params)
    check_prefill_and_decode(hf_dir, tmp_path)


def check_prefill_and_decode(hf_dir, tmp_path):
    convert(hf_dir, tmp_path / "ckpt", progress=False)
    ref = ReferenceModel.from_checkpoint(tmp_path / "ckpt")
    hf = load_hf(hf_dir)
    prompt = torch.randint(3, hf.config.vocab_size, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    assert_follows_hf(ref, hf, prompt)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_shards_match_tp1(case, tp, hf_models, tmp_path):
    hf_dir = hf_models[case]
    convert(hf_dir, tmp_path / "tp1", progress=False)
    convert(hf_dir, tmp_path / f"tp{tp}", tp_size=tp, progress=False)
    one, many = ReferenceModel.from_checkpoint(tmp_path / "tp1"), ReferenceModel.from_checkpoint(tmp_path / f"tp{tp}")
    assert len(many.ranks) == tp
    prompt = torch.randint(3, 131, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(2))
    c1, cn = one.new_cache(), many.new_cache()
    a, b = one.forward(prompt, c1), many.forward(prompt, cn)
    assert rel_err(b, a) < 1e-5
    for _ in range(4):  # decode steps through the sharded caches
        token = a[:, -1:].argmax(-1)
        a, b = one.forward(token, c1), many.forward(token, cn)
        assert rel_err(b, a) < 1e-5


def test_legacy_rope_config_style(tmp_path):
    """`rope_theta` + `rope_scaling` (transformers 4 configs) reads the same as `rope_parameters`."""
    new = make_hf_model(tmp_path / "new", "llama3_gqa")
    old = make_hf_model(tmp_path / "old", "llama3_gqa", legacy_rope=True)
    convert(new, tmp_path / "c_new", progress=False)
    convert(old, tmp_path / "c_old", progress=False)
    g_new = ReferenceModel.from_checkpoint(tmp_path / "c_new").graph
    g_old = ReferenceModel.from_checkpoint(tmp_path / "c_old").graph
    assert g_old.layers[0].attention.rope == g_new.layers[0].attention.rope
    assert g_old.layers[0].attention.rope.type == "llama3"
    # and the legacy config still matches HF's logits
    ref, hf = ReferenceModel.from_checkpoint(tmp_path / "c_old"), load_hf(old)
    prompt = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert rel_err(ref.forward(prompt, ref.new_cache()), hf(prompt).logits) < REL_TOL


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "linear", "factor": 4.0}])
def test_rope_scaling_kinds(rope, tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", "llama3_gqa", rope_parameters={"rope_theta": 10000.0, **rope},
                           max_position_embeddings=16)
    convert(hf_dir, tmp_path / "ckpt", progress=False)
    ref, hf = ReferenceModel.from_checkpoint(tmp_path / "ckpt"), load_hf(hf_dir)
    prompt = torch.arange(3, 15)[None]  # within max_position_embeddings: dynamic scaling is a no-op there
    with torch.no_grad():
        assert rel_err(ref.forward(prompt, ref.new_cache()), hf(prompt).logits) < REL_TOL
