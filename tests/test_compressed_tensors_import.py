"""compressed-tensors checkpoints, made by the compressed-tensors library, through `trtc convert` and
`trtc build`: the engine's prompt logits against the library's own fake-quantized forward of the
same model (weights dequantized by the library; FP8 activations quantized with the same static scale)."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import assert_one_line_error, cli
from ct_checkpoints import make_ct_model
from oracles.reference import ReferenceModel
from safetensors.torch import load_file

from trtc.runtime.executor import Executor

PROMPT = [int(t) for t in torch.randint(3, 131, (23,), generator=torch.Generator().manual_seed(1))]


# tolerance: float32 everywhere; the engine and the library differ in summation order only (FP8:
# fp8 x fp8 products accumulated in float32 vs dequantized float32 products)
@pytest.mark.parametrize("scheme, algo, tensors", [
    ("FP8", "FP8", {"layers.0.mlp.down.weight_scale": ()}),
    ("FP8_CHANNEL", "FP8", {"layers.0.mlp.down.weight_scale": (128,), "layers.0.attention.q.weight_scale": (128,)}),
    ("W4A16", "W4A16_GPTQ", {"layers.0.mlp.down.weight": (128, 128), "layers.0.mlp.down.weight_scale": (128, 2)}),
    ("W4A16_ASYM", "W4A16_GPTQ", {"layers.0.mlp.down.weight_zero": (128, 2)}),
])
def test_engine_equals_the_libraries_fake_quantized_model(tmp_path, scheme, algo, tensors):
    oracle, qdir = make_ct_model(tmp_path, scheme)
    ckpt, engine = tmp_path / "ckpt", tmp_path / "engine"
    assert cli("convert", "--model_dir", qdir, "--output_dir", ckpt).exit_code == 0
    quant = json.loads((ckpt / "config.json").read_text())["quantization"]
    assert quant["quant_algo"] == algo and quant["producer"]["name"] == "compressed-tensors"
    assert quant["has_zero_point"] == (scheme == "W4A16_ASYM")
    assert quant["weight_scale_per_channel"] == (scheme == "FP8_CHANNEL")
    w = load_file(str(ckpt / "rank0.safetensors"))
    for name, shape in tensors.items():
        assert tuple(w[name].shape) == shape, name
    result = cli("build", "--checkpoint_dir", ckpt, "--output_dir", engine, "--max_batch_size", 2,
                    "--max_seq_len", 64, "--max_num_tokens", 16, "--backend", "cuda")
    assert result.exit_code == 0, result.output
    ex = Executor(engine, kv_cache_max_tokens=256)
    try:
        got = ex.prompt_logits([PROMPT])[0]  # prefilled in two chunks of the 16-token budget
    finally:
        ex.close()
    with torch.no_grad():
        want = oracle(torch.tensor([PROMPT])).logits[0]
    err = float((got - want).abs().max() / want.abs().max())
    assert err < 1e-4, err


def test_tensor_parallel_split_is_exact(tmp_path):
    """tp 2 (row-parallel packed weights split by bytes, zero points by groups, per-channel FP8
    scales with their rows) computes what tp 1 does."""
    for scheme in ("W4A16_ASYM", "FP8_CHANNEL"):
        _, qdir = make_ct_model(tmp_path / scheme, scheme, hidden_size=256, intermediate_size=512)
        for tp in (1, 2):
            assert cli("convert", "--model_dir", qdir, "--output_dir", tmp_path / scheme / f"tp{tp}",
                          "--tp", tp).exit_code == 0
        one, two = (ReferenceModel.from_checkpoint(tmp_path / scheme / f"tp{tp}") for tp in (1, 2))
        prompt = torch.tensor([PROMPT])
        a, b = one.forward(prompt, one.new_cache()), two.forward(prompt, two.new_cache())
        assert float((a - b).abs().max() / a.abs().max()) < 1e-5, scheme


@pytest.mark.parametrize("scheme, words", [
    ("FP8_DYNAMIC", ["float8 token dynamic", "not supported", "W4A16"]),
    ("W8A8", ["weights int8 channel", "not supported"]),
    ("W4A16", ["KV-cache scheme"]),
])
def test_unsupported_schemes_get_one_line(tmp_path, scheme, words):
    _, qdir = make_ct_model(tmp_path, scheme)
    if words == ["KV-cache scheme"]:
        config = json.loads((qdir / "config.json").read_text())
        config["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor"}
        (qdir / "config.json").write_text(json.dumps(config))
    assert_one_line_error(cli("convert", "--model_dir", qdir, "--output_dir", tmp_path / "o"), *words, whole_output=True)
    assert not (tmp_path / "o").exists()
