"""`trtc quantize` (ModelOpt calibration -> ModelOpt's HF export -> the converter's importer) on a
tiny random Llama: the checkpoint follows trtc/formats/quant_layout.py, and the reference forward
and the engine reproduce ModelOpt's fake-quantized model.

Tolerances. INT4 (weight-only) is deterministic arithmetic: trtc's logits equal ModelOpt's to
float32 rounding (relative 1e-5). FP8 also quantizes activations, and an FP8 GEMM (trtc) scales
the accumulated FP8 products once where ModelOpt's fake quantization multiplies dequantized
values: the outputs differ by float32 rounding, which now and then puts an activation on the other
side of an FP8 rounding boundary in the next layer, and later layers carry that on (fp8_gemm_order
below). So FP8 is checked per linear layer on ModelOpt's own inputs (relative 2e-3: a few
neighbouring FP8 values), and end to end against the size of the quantization error itself.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import assert_one_line_error, cli
from models import WORDS, add_word_tokenizer, load_hf, make_hf_model
from oracles.reference import ReferenceModel
from safetensors import safe_open

from trtc.compiler.build import build
from trtc.converters.convert import convert
from trtc.formats.build_config import BuildConfig
from trtc.llm import LLM
from trtc.plugins.gemm import linear
from trtc.quantization.quantize import calibrate, export
from trtc.runtime.executor import Executor
from trtc.runtime.sampling_params import SamplingParams
from trtc.tools.perplexity import prompt_logprobs

GROUP = 64  # the tiny model's in-features are 128 and 256
TINY = dict(hidden_size=128, intermediate_size=256)  # 4 heads of 32, 2 KV heads
CASES = {"fp8": ("fp8", False, "lite"), "fp8_kv": ("fp8", True, "lite"), "int4_awq": ("int4_awq", False, "lite"),
         "int4_awq_clip": ("int4_awq", False, "clip"), "int4_gptq": ("int4_gptq", False, "lite")}
HF_LINEARS = {"self_attn.q_proj": "attention.q", "self_attn.k_proj": "attention.k", "self_attn.v_proj": "attention.v",
              "self_attn.o_proj": "attention.o", "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up",
              "mlp.down_proj": "mlp.down"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def resmooth(model) -> None:
    """What ModelOpt's export does to the model first (AWQ: one pre_quant_scale for q/k/v and for
    gate/up, weights requantized): the fake-quantized model that the export describes."""
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    with contextlib.redirect_stdout(io.StringIO()):
        requantize_resmooth_fused_llm_layers(model)


@contextlib.contextmanager
def fp8_gemm_order(model):
    """ModelOpt's FP8 linears evaluated in the order of an FP8 GEMM, as the engine computes them:
    (fp8(x / s_x) @ fp8(w / s_w)^T) * (s_x * s_w), the exact FP8 products accumulated in float32 and
    scaled once. ModelOpt's fake quantization dequantizes first and multiplies the float32 values,
    so each output differs by float32 rounding (~4e-7 relative). Downstream that is not harmless:
    where an activation sits at an FP8 rounding boundary, the next FP8 layer rounds it to the
    neighbouring value (1/16 of it apart), and each FP8 layer after that multiplies such a
    difference again, so after a few layers two correct computations of the same quantized model
    differ by a fraction of the quantization error, depending on the random weights (a 3-layer
    Gemma 3 by 4.6e-2 with seed 0, 2.4e-4 with seed 1; a 3-layer Llama by 3.4e-3). Yields
    {linear name: relative difference from ModelOpt's own forward on the same input}."""
    gaps: dict[str, float] = {}
    patched = []
    for name, m in model.named_modules():
        q = getattr(m, "input_quantizer", None)
        if isinstance(m, torch.nn.Linear) and q is not None and q.is_enabled:
            assert q.num_bits == (4, 3) and m.weight_quantizer.num_bits == (4, 3), name  # per-tensor FP8
            patched.append(m)
            m.forward = functools.partial(_fp8_gemm, m, m.forward, name, gaps)
    try:
        yield gaps
    finally:
        for m in patched:
            del m.forward  # back to the class's forward


def _fp8_gemm(m, modelopt_forward, name: str, gaps: dict[str, float], x: torch.Tensor) -> torch.Tensor:
    sx, sw = m.input_quantizer.amax.float() / 448, m.weight_quantizer.amax.float() / 448
    xq = (x.float() / sx).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    wq = (m.weight.float() / sw).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    y = F.linear(xq, wq) * (sx * sw)
    y = (y if m.bias is None else y + m.bias).to(x.dtype)
    gaps[name] = max(gaps.get(name, 0.0), rel(y, modelopt_forward(x)))
    return y


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    hf = add_word_tokenizer(make_hf_model(root / "hf", "llama3_gqa", **TINY))
    g = torch.Generator().manual_seed(0)
    (root / "calib.txt").write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (600,), generator=g)))
    calib = [torch.cat([torch.ones(4, 1, dtype=torch.long), torch.randint(3, 131, (4, 63), generator=g)], 1)]
    prompt = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.randint(3, 131, (2, 40), generator=g)], 1)
    return root, hf, calib, prompt


@pytest.fixture(scope="module")
def quantized(tiny):
    """Per case: the converted checkpoint, ModelOpt's fake-quantized logits and each linear's
    (input, output) in that model, the unquantized logits."""
    root, hf, calib, prompt = tiny
    out = {}
    for case, (qformat, kv, awq_algorithm) in CASES.items():
        model = load_hf(hf)
        with torch.no_grad():
            base = model(prompt).logits
        calibrate(model, qformat, calib, kv, GROUP, awq_algorithm)
        resmooth(model)
        linears, hooks = {}, []
        for name, module in model.named_modules():
            for hf_suffix, trtc_name in HF_LINEARS.items():
                if name.endswith(hf_suffix):
                    key = f"layers.{name.split('.')[2]}.{trtc_name}"
                    hooks.append(module.register_forward_hook(
                        lambda m, i, o, key=key: linears.__setitem__(key, (i[0], o))))
        with torch.no_grad():
            fake = model(prompt).logits
        for h in hooks:
            h.remove()
        export(model, root / case / "hf")
        for f in hf.glob("tokenizer*"):
            (root / case / "hf" / f.name).write_bytes(f.read_bytes())
        convert(root / case / "hf", root / case / "ckpt", progress=False)
        out[case] = (root / case / "ckpt", fake, base, linears)
    return out


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_follows_the_layout(case, quantized):
    ckpt = quantized[case][0]
    q = json.loads((ckpt / "config.json").read_text())["quantization"]
    assert q["quant_algo"] == ("FP8" if case.startswith("fp8") else "W4A16_AWQ")  # ModelOpt's name for all INT4
    assert q["kv_cache_quant_algo"] == ("FP8" if case == "fp8_kv" else None)
    assert q["producer"]["name"] == "modelopt" and q["exclude_modules"] == []
    with safe_open(str(ckpt / "rank0.safetensors"), "pt") as f:
        names = set(f.keys())
        w = {n: f.get_tensor(n) for n in names if n.startswith("layers.0.")}
    assert "embedding.weight" in names and w["layers.0.input_norm.weight"].dtype == torch.float32
    if case.startswith("fp8"):
        assert w["layers.0.mlp.down.weight"].dtype == torch.float8_e4m3fn
        assert w["layers.0.mlp.down.weight"].shape == (128, 256)
        for s in ("weight_scale", "input_scale"):
            assert w[f"layers.0.mlp.down.{s}"].shape == () and w[f"layers.0.mlp.down.{s}"].dtype == torch.float32
        # the export gives q/k/v one input scale (they read the same activations)
        assert w["layers.0.attention.q.input_scale"] == w["layers.0.attention.k.input_scale"]
    else:
        assert w["layers.0.mlp.down.weight"].dtype == torch.uint8 and w["layers.0.mlp.down.weight"].shape == (128, 128)
        assert w["layers.0.mlp.down.weight_scale"].shape == (128, 256 // GROUP)
        assert w["layers.0.attention.q.weight_scale"].shape == (128, 128 // GROUP)
        # AWQ lite: q/k/v's and gate/up's pre_quant_scale are folded into the norms; o and down keep
        # theirs. AWQ clip and GPTQ have none.
        awq = case == "int4_awq"
        assert ("layers.0.attention.o.pre_quant_scale" in w) == awq and ("layers.0.mlp.down.pre_quant_scale" in w) == awq
        assert "layers.0.attention.q.pre_quant_scale" not in w
    assert ("layers.0.attention.k_cache_scale" in w) == (case == "fp8_kv")


@pytest.mark.parametrize("case", CASES)
def test_each_linear_matches_modelopt_on_its_inputs(case, quantized):
    ckpt, _, _, linears = quantized[case]
    ref = ReferenceModel.from_checkpoint(ckpt)
    tol = 2e-3 if case.startswith("fp8") else 1e-5
    assert len(linears) == 14
    for name, (x, y) in linears.items():
        assert rel(linear(x, ref.ranks[0], name), y) < tol, name


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_modelopt_fake_quant(case, quantized, tiny):
    ckpt, fake, base, _ = quantized[case]
    prompt = tiny[3]
    ref = ReferenceModel.from_checkpoint(ckpt)
    got = ref.forward(prompt, ref.new_cache())
    quant_error = rel(fake, base)
    assert quant_error > 0.05  # quantization changed the model (the comparison below means something)
    if case.startswith("int4"):
        assert rel(got, fake) < 1e-5
    else:
        assert rel(got, fake) < 0.1 * quant_error
        assert float((got.argmax(-1) == fake.argmax(-1)).float().mean()) >= 0.95


def test_reference_dtype_override_keeps_quantized_tensors(quantized):
    w = ReferenceModel.from_checkpoint(quantized["fp8_kv"][0], dtype="bfloat16").ranks[0]
    assert w["layers.0.input_norm.weight"].dtype == torch.bfloat16
    assert w["layers.0.attention.q.weight"].dtype == torch.float8_e4m3fn
    assert w["layers.0.attention.q.weight_scale"].dtype == torch.float32
    assert w["layers.0.attention.k_cache_scale"].dtype == torch.float32


@pytest.mark.parametrize("case", CASES)
def test_engine_matches_reference(case, quantized, tmp_path):
    """The engine (fused qkv / gate_up, paged KV cache, chunked prefill) adds no error to the reference."""
    ckpt, _, _, _ = quantized[case]
    engine = build(ckpt, tmp_path / "engine", BuildConfig(tokens_per_block=4, max_num_tokens=16, max_seq_len=128),
                   progress=False)
    config = json.loads((engine / "config.json").read_text())
    assert config["build_config"]["kv_cache_dtype"] == ("fp8" if case == "fp8_kv" else "float32")
    with safe_open(str(engine / "rank0.engine"), "pt") as f:
        assert f.get_slice("layers.0.attention.qkv.weight").get_shape()[0] == 128 + 64 + 64
        if case.startswith("fp8"):  # per-row scales: each part's weights unchanged
            scale = f.get_tensor("layers.0.attention.qkv.weight_scale")
            with safe_open(str(ckpt / "rank0.safetensors"), "pt") as c:
                parts = [c.get_tensor(f"layers.0.attention.{m}.weight_scale") for m in "qkv"]
            assert torch.equal(scale, torch.cat([parts[0].expand(128), parts[1].expand(64), parts[2].expand(64)]))
    prompts = [[1, *range(5, 35)], [1, *range(40, 52)]]
    ex = Executor(engine, kv_cache_max_tokens=256)
    got = prompt_logprobs(ex, prompts)
    ref = ReferenceModel.from_checkpoint(ckpt)
    for p, lp in zip(prompts, got):
        logits = ref.forward(torch.tensor([p]), ref.new_cache())[0, :-1]
        want = torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(p[1:])[:, None]).squeeze(1)
        err = float((lp - want).abs().max())
        assert err < 1e-4, err


@pytest.mark.parametrize("case", ["int4_awq", "fp8_kv"])
def test_tensor_parallel_split_of_quantized_tensors(case, quantized, tiny, tmp_path):
    ckpt = quantized[case][0]
    convert(ckpt.parent / "hf", tmp_path / "tp2", tp_size=2, progress=False)
    one, two = ReferenceModel.from_checkpoint(ckpt), ReferenceModel.from_checkpoint(tmp_path / "tp2")
    with safe_open(str(tmp_path / "tp2" / "rank1.safetensors"), "pt") as f:
        shape = f.get_slice("layers.0.attention.o.weight").get_shape()
        if case == "int4_awq":  # row-parallel: half the input columns, two per byte; groups split too
            assert shape == [128, 32]
            assert f.get_slice("layers.0.attention.o.weight_scale").get_shape() == [128, 1]
            assert f.get_slice("layers.0.attention.o.pre_quant_scale").get_shape() == [64]
            assert f.get_slice("layers.0.attention.q.weight_scale").get_shape() == [64, 2]
        else:
            assert shape == [128, 64] and f.get_slice("layers.0.attention.o.input_scale").get_shape() == []
    prompt = tiny[3]
    a, b = one.forward(prompt, one.new_cache()), two.forward(prompt, two.new_cache())
    assert rel(b, a) < (1e-5 if case == "int4_awq" else 0.05)


@pytest.mark.parametrize("case", ["fp8_kv", "int4_awq"])
def test_tensor_parallel_quantized_engine_gives_the_tokens_of_tp1(case, quantized, tmp_path):
    """The same ModelOpt export converted for tp 1 and tp 2: the tp 2 engine, run as two processes
    (gloo), gives the greedy tokens of the tp 1 engine (FP8 weights, activations and KV cache; INT4)."""
    ckpt = quantized[case][0]
    convert(ckpt.parent / "hf", tmp_path / "tp2", tp_size=2, progress=False)
    config = BuildConfig(tokens_per_block=4, max_num_tokens=16, max_seq_len=128)
    prompts = [[1, *range(5, 35)], [1, *range(40, 52)], [1, 7]]
    tokens = []
    for tp, checkpoint in ((1, ckpt), (2, tmp_path / "tp2")):
        engine = build(checkpoint, tmp_path / f"engine{tp}", config, progress=False)
        with LLM(engine, kv_cache_max_tokens=256) as llm:
            tokens.append([o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=16, end_id=-1))])
    assert tokens[0] == tokens[1]


def test_quantize_build_run_eval_cli(tiny, tmp_path):
    root, hf, _, _ = tiny
    ckpt, engine = tmp_path / "ckpt", tmp_path / "engine"
    result = cli("quantize", "--model_dir", hf, "--output_dir", ckpt, "--qformat", "int4_awq", "--awq_block_size", GROUP,
                 "--kv_cache_dtype", "fp8", "--calib_dataset", root / "calib.txt", "--calib_size", 4,
                 "--calib_max_seq_length", 64, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("wrote")
    config = json.loads((ckpt / "config.json").read_text())
    q = config["quantization"]
    assert config["dtype"] == "bfloat16" and q["quant_algo"] == "W4A16_AWQ" and q["kv_cache_quant_algo"] == "FP8"
    assert q["group_size"] == GROUP and q["calibration"]["windows"] == 4 and q["calibration"]["algorithm"] == "awq_clip"  # the default
    assert cli("build", "--checkpoint_dir", ckpt, "--output_dir", engine).exit_code == 0
    assert json.loads((engine / "config.json").read_text())["build_config"]["kv_cache_dtype"] == "fp8"
    result = cli("run", "--engine_dir", engine, "--input_text", "w1 w2 w3", "--max_output_len", 8, "--end_id", -1)
    assert result.exit_code == 0 and "Output [Text 0 Beam 0]" in result.output
    result = cli("eval", "--engine_dir", engine, "--dataset", root / "calib.txt", "--max_seq_len", 64,
                 "--output_json", tmp_path / "ppl.json")
    assert result.exit_code == 0, result.output
    r = json.loads((tmp_path / "ppl.json").read_text())
    assert r["num_tokens"] == 600 and 1 < r["perplexity"] < 1000


def test_build_shortcut_quantizes(tiny, tmp_path):
    root, hf, _, _ = tiny
    result = cli("build", "--model_dir", hf, "--output_dir", tmp_path / "e", "--int4_gptq", "--awq_block_size", GROUP,
                 "--calib_dataset", root / "calib.txt", "--calib_size", 2, "--calib_max_seq_length", 32)
    assert result.exit_code == 0, result.output
    pretrained = json.loads((tmp_path / "e" / "config.json").read_text())["pretrained_config"]
    assert pretrained["quantization"]["quant_algo"] == "W4A16_GPTQ"
    assert pretrained["quantization"]["calibration"]["algorithm"] == "gptq (layerwise)"


def test_bad_quantize_input(tiny, tmp_path):
    root, hf, _, _ = tiny
    out = tmp_path / "o"
    base = ["--model_dir", hf, "--output_dir", out, "--calib_dataset", root / "calib.txt", "--calib_size", 2]
    assert_one_line_error(cli("build", "--model_dir", hf, "--output_dir", out, "--fp8", "--int4_awq",
                              "--calib_dataset", root / "calib.txt"), "--fp8", "--int4_awq")
    assert_one_line_error(cli("build", "--checkpoint_dir", root / "fp8" / "ckpt", "--output_dir", out, "--fp8"),
                          "--model_dir")
    assert_one_line_error(cli("build", "--model_dir", hf, "--output_dir", out, "--kv_cache_dtype", "fp8"),
                          "KV-cache scales")
    narrow = add_word_tokenizer(make_hf_model(tmp_path / "narrow", "llama3_gqa"))  # in-features 64 and 96
    assert_one_line_error(cli("quantize", *base[:1], narrow, *base[2:], "--qformat", "int4_awq"),
                          "64 input features", "group size 128")  # the default group size
    assert_one_line_error(cli("quantize", *base, "--qformat", "int4_awq", "--group_size", 48), "--group_size 48")
    assert_one_line_error(cli("quantize", "--model_dir", hf, "--output_dir", out, "--qformat", "fp8",
                              "--calib_dataset", root / "nope.txt"), "nope.txt", "does not exist")
    (tmp_path / "empty.txt").write_text("\n")
    assert_one_line_error(cli("quantize", "--model_dir", hf, "--output_dir", out, "--qformat", "fp8",
                              "--calib_dataset", tmp_path / "empty.txt"), "empty.txt", "is empty")
    assert_one_line_error(cli("quantize", *base, "--qformat", "fp8", "--calib_max_seq_length", 5000), "fewer than one window")
    assert_one_line_error(cli("quantize", *base, "--qformat", "int4_awq", "--awq_block_size", GROUP, "--tp", 4),
                          "--tp 4", "group size")
    assert_one_line_error(cli("quantize", *base, "--qformat", "fp8", "--device", "cuda"), "cuda") if not torch.cuda.is_available() else None
    # an already quantized model is imported with convert, not quantized again
    base[1] = root / "fp8" / "hf"
    assert_one_line_error(cli("quantize", *base, "--qformat", "fp8"), "already quantized", "trtc convert")
    assert not out.exists() and not list(tmp_path.glob(".o*"))


def test_fp8_kv_build_needs_scales(quantized, tmp_path):
    assert_one_line_error(cli("build", "--checkpoint_dir", quantized["fp8"][0], "--output_dir", tmp_path / "e",
                              "--kv_cache_dtype", "fp8"), "KV-cache scales", "--kv_cache_dtype fp8")
    # an FP8-KV checkpoint may still be built with a bf16 pool
    assert cli("build", "--checkpoint_dir", quantized["fp8_kv"][0], "--output_dir", tmp_path / "e2",
               "--kv_cache_dtype", "bfloat16").exit_code == 0


def test_bad_modelopt_checkpoints(quantized, tmp_path):
    import shutil

    src = quantized["int4_awq"][0].parent / "hf"

    def broken(edit):
        d = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(src, d)
        edit(d)
        return cli("convert", "--model_dir", d, "--output_dir", tmp_path / "out")

    def algo(name):
        def edit(d):
            c = json.loads((d / "hf_quant_config.json").read_text())
            c["quantization"]["quant_algo"] = name
            (d / "hf_quant_config.json").write_text(json.dumps(c))
        return edit

    assert_one_line_error(broken(algo("NVFP4")), "NVFP4", "FP8", "W4A16_AWQ")
    assert_one_line_error(broken(lambda d: (d / "hf_quant_config.json").write_text("{")), "hf_quant_config.json")

    def drop_scale(d):
        from safetensors.torch import load_file, save_file

        w = load_file(str(d / "model.safetensors"))
        del w["model.layers.1.mlp.down_proj.weight_scale"]
        save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})

    assert_one_line_error(broken(drop_scale), "model.layers.1.mlp.down_proj.weight_scale", "missing")

    def extra(d):
        from safetensors.torch import load_file, save_file

        w = load_file(str(d / "model.safetensors"))
        w["model.layers.0.mlp.down_proj.weight_zero_point"] = torch.zeros(3)
        save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})

    assert_one_line_error(broken(extra), "weight_zero_point", "not used")
    assert not (tmp_path / "out").exists()


def test_unquantized_layer_of_a_modelopt_export_is_excluded(quantized, tiny, tmp_path):
    """A linear that a ModelOpt export keeps in float (excluded from quantization) stays a float
    layer: the checkpoint lists it in exclude_modules and computes it unquantized."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = quantized["fp8"][0].parent / "hf"
    shutil.copytree(src, tmp_path / "hf")
    w = load_file(str(tmp_path / "hf" / "model.safetensors"))
    p = "model.layers.1.mlp.down_proj."
    w[p + "weight"] = w[p + "weight"].float() * w.pop(p + "weight_scale")
    del w[p + "input_scale"]
    save_file(w, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    convert(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["quantization"]["exclude_modules"] == ["layers.1.mlp.down"]
    ref = ReferenceModel.from_checkpoint(tmp_path / "ckpt")
    assert ref.ranks[0]["layers.1.mlp.down.weight"].dtype == torch.float32
    assert "layers.1.mlp.down.input_scale" not in ref.ranks[0]
    x = quantized["fp8"][3]["layers.1.mlp.down"][0]
    assert torch.allclose(linear(x, ref.ranks[0], "layers.1.mlp.down"), x @ w[p + "weight"].T, rtol=1e-5, atol=1e-5)


def test_fused_pre_quant_scales_must_agree(quantized, tmp_path):
    """An INT4 checkpoint whose q/k/v carry a pre_quant_scale each fuses when they are equal, and is
    refused with one line when they differ (one GEMM can scale its input only one way)."""
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(quantized["int4_awq"][0], ckpt)
    w = load_file(str(ckpt / "rank0.safetensors"))
    for m in "qkv":
        w[f"layers.0.attention.{m}.pre_quant_scale"] = torch.full((128,), 1.5)
    save_file(w, str(ckpt / "rank0.safetensors"), metadata={"format": "pt"})
    engine = build(ckpt, tmp_path / "engine", progress=False)
    with safe_open(str(engine / "rank0.engine"), "pt") as f:
        assert f.get_slice("layers.0.attention.qkv.pre_quant_scale").get_shape() == [128]
    w["layers.0.attention.v.pre_quant_scale"] = torch.full((128,), 2.0)
    save_file(w, str(ckpt / "rank0.safetensors"), metadata={"format": "pt"})
    assert_one_line_error(cli("build", "--checkpoint_dir", ckpt, "--output_dir", tmp_path / "e2"),
                          "layers.0.attention.v.pre_quant_scale", "differ")
    assert not (tmp_path / "e2").exists()


@pytest.mark.parametrize("case", ["llama2_tied_bias", "mistral_window", "qwen2_tied", "qwen3_qknorm"])
def test_every_architecture_quantizes(case, tmp_path):
    """Quantization is one pass for every architecture: biases, tied embeddings, q/k norms and
    sliding windows come through INT4 (group 32 divides these models' 64 and 96 features) exactly."""
    hf = make_hf_model(tmp_path / "hf", case)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(3, 131, (4, 32), generator=g)]
    prompt = torch.randint(3, 131, (1, 20), generator=g)
    model = load_hf(hf)
    calibrate(model, "int4_awq", calib, group_size=32)
    resmooth(model)
    with torch.no_grad():
        fake = model(prompt).logits
    export(model, tmp_path / "export")
    convert(tmp_path / "export", tmp_path / "ckpt", progress=False)
    ref = ReferenceModel.from_checkpoint(tmp_path / "ckpt")
    assert rel(ref.forward(prompt, ref.new_cache()), fake) < 1e-5


def test_quantize_report_and_defaults(tiny, tmp_path):
    """With no --calib_dataset the shipped text calibrates; the report compares with the unquantized
    model through engines and lands in quant_report.json."""
    root, hf, _, _ = tiny
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": " ".join(f"w{(7 * i + j) % 120}" for j in range(60))}) for i in range(40)))
    result = cli("quantize", "--model_dir", hf, "--output_dir", tmp_path / "q", "--qformat", "fp8", "--calib_size", 2,
                 "--calib_max_seq_len", 32, "--eval_dataset", jsonl)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    assert report["quant_algo"] == "FP8" and report["eval_text"] == "eval.jsonl"
    p = report["perplexity"]
    assert p["num_tokens"] > 1000 and p["unquantized"] > 1 and p["quantized"] > 1
    assert abs(p["increase"] - (p["quantized"] / p["unquantized"] - 1)) < 1e-12
    assert 0 <= report["greedy_agreement"] <= 1 and "greedy-token agreement" in result.output
    calibration = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["calibration"]
    assert calibration["dataset"] == ["calibration.txt"] and calibration["windows"] == 2
