"""Importing GPTQ int4 checkpoints (AutoGPTQ / GPTQModel: qweight, qzeros, scales, g_idx): a
synthetic checkpoint is packed from known integers, and the converted trtc checkpoint must
compute exactly the HF model whose float weights are those integers dequantized."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, cli
from models import load_hf, make_hf_model
from oracles.reference import ReferenceModel
from safetensors.torch import load_file, save_file

from trtc.converters.convert import convert

GROUP = 32
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def pack_rows(u: torch.Tensor) -> torch.Tensor:
    """[n, m] nibbles -> int32 [n / 8, m]: nibble j of word [r, c] is u[8r + j, c]."""
    v = u.to(torch.int64).contiguous().reshape(-1, 8, u.shape[1])
    word = sum(v[:, j] << (4 * j) for j in range(8))
    return torch.from_numpy(word.numpy().astype(np.uint32).view(np.int32))


def quantize_linear(w: torch.Tensor, sym: bool, act_order: bool, g: torch.Generator):
    """GPTQ tensors of a weight [out, in] and the float weight they stand for."""
    out, inp = w.shape
    if act_order:
        perm = torch.randperm(inp, generator=g)
        g_idx = torch.empty(inp, dtype=torch.int32)
        g_idx[perm] = (torch.arange(inp) // GROUP).to(torch.int32)
    else:
        g_idx = (torch.arange(inp) // GROUP).to(torch.int32)
    groups = inp // GROUP
    scales = torch.empty(groups, out)
    zeros = torch.empty(groups, out, dtype=torch.int64)
    for k in range(groups):
        cols = w[:, g_idx == k]
        if sym:
            scales[k] = cols.abs().amax(1) / 7.5
            zeros[k] = 8
        else:
            lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            scales[k] = (hi - lo) / 15
            zeros[k] = torch.round(-lo / scales[k]).long()
    scales = scales.half()  # checkpoints store fp16 scales
    s, z = scales.float()[g_idx.long()].T, zeros[g_idx.long()].T  # [out, in]
    u = torch.clamp(torch.round(w / s) + z, 0, 15).long()
    return u, s, z, scales, zeros, g_idx, (u - z) * s


def make_gptq_model(directory, sym: bool, act_order: bool, v2: bool, seed: int = 0):
    """A float HF model (`directory / 'float'`, the dequantized weights) and its GPTQ checkpoint
    (`directory / 'gptq'`)."""
    fdir, qdir = directory / "float", directory / "gptq"
    make_hf_model(fdir, "llama3_gqa", hidden_size=128, intermediate_size=256, tie_word_embeddings=True)
    make_hf_model(qdir, "llama3_gqa", hidden_size=128, intermediate_size=256, tie_word_embeddings=True)
    weights = load_file(str(fdir / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    quant = {}
    for name in list(weights):
        if not any(name.endswith(f"{lin}.weight") for lin in LINEARS):
            continue
        u, s, z, scales, zeros, g_idx, deq = quantize_linear(weights[name], sym, act_order, g)
        weights[name] = deq
        module = name[: -len(".weight")]
        stored = zeros if v2 else (zeros - 1) & 0xF
        quant[module + ".qweight"] = pack_rows(u.T)
        quant[module + ".qzeros"] = pack_rows(stored.T).T.contiguous()
        quant[module + ".scales"] = scales
        quant[module + ".g_idx"] = g_idx
        quant[module + ".bias"] = torch.zeros(u.shape[0], dtype=torch.float16)  # AutoGPTQ's bias buffer
    save_file(weights, str(fdir / "model.safetensors"), metadata={"format": "pt"})
    rest = {k: v for k, v in weights.items() if not any(k.endswith(f"{lin}.weight") for lin in LINEARS)}
    save_file({**rest, **quant}, str(qdir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((qdir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": act_order,
                                     "sym": sym, "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    (qdir / "config.json").write_text(json.dumps(config))
    return fdir, qdir


@pytest.mark.parametrize("sym, act_order, v2", [(True, False, False), (False, False, False), (False, True, True),
                                                (True, True, False)])
def test_gptq_checkpoint_equals_its_dequantized_model(tmp_path, sym, act_order, v2):
    fdir, qdir = make_gptq_model(tmp_path, sym, act_order, v2)
    convert(qdir, tmp_path / "ckpt", progress=False)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization"]
    assert config["quant_algo"] == "W4A16_GPTQ" and config["group_size"] == GROUP
    assert config["has_zero_point"] == (not sym) and config["has_input_perm"] == act_order
    w = load_file(str(tmp_path / "ckpt" / "rank0.safetensors"))
    assert w["layers.1.mlp.down.weight"].dtype == torch.uint8 and w["layers.1.mlp.down.weight"].shape == (128, 128)
    assert w["layers.1.mlp.down.weight_scale"].shape == (128, 256 // GROUP)
    assert ("layers.1.mlp.down.weight_zero" in w) == (not sym) and ("layers.1.mlp.down.input_perm" in w) == act_order
    ref, hf = ReferenceModel.from_checkpoint(tmp_path / "ckpt"), load_hf(fdir)
    prompt = torch.randint(3, 131, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(prompt).logits
    got = ref.forward(prompt, ref.new_cache())
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_gptq_tensor_parallel(tmp_path):
    _, qdir = make_gptq_model(tmp_path, sym=False, act_order=False, v2=False)
    convert(qdir, tmp_path / "tp1", progress=False)
    convert(qdir, tmp_path / "tp2", tp_size=2, progress=False)
    one, two = ReferenceModel.from_checkpoint(tmp_path / "tp1"), ReferenceModel.from_checkpoint(tmp_path / "tp2")
    prompt = torch.arange(3, 30)[None]
    a, b = one.forward(prompt, one.new_cache()), two.forward(prompt, two.new_cache())
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5


def test_bad_gptq_checkpoints(tmp_path):
    _, qdir = make_gptq_model(tmp_path, sym=True, act_order=True, v2=False)

    def run(**kw):
        return cli("convert", "--model_dir", qdir, "--output_dir", tmp_path / "o",
                   *[a for kv in kw.items() for a in (f"--{kv[0]}", kv[1])])

    assert_one_line_error(run(tp=2), "act-order", "--tp 1", whole_output=True)
    weights = load_file(str(qdir / "model.safetensors"))
    weights["model.layers.0.mlp.up_proj.bias"][3] = 1.0  # a real bias the Llama graph has no place for
    save_file(weights, str(qdir / "model.safetensors"), metadata={"format": "pt"})
    assert_one_line_error(run(), "model.layers.0.mlp.up_proj.bias", "not used", whole_output=True)
    config = json.loads((qdir / "config.json").read_text())
    for key, value, words in [("bits", 8, ["8-bit"]), ("group_size", -1, ["group_size -1"]),
                              ("checkpoint_format", "marlin", ["marlin"]), ("quant_method", "awq", ["'awq'", "ModelOpt"])]:
        (qdir / "config.json").write_text(json.dumps({**config, "quantization_config": {
            **config["quantization_config"], key: value}}))
        assert_one_line_error(run(), *words, whole_output=True)
    assert not (tmp_path / "o").exists()
