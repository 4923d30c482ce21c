"""TensorRT plans from `trtc build --backend tensorrt`, run by the executor, against the cuda backend
on the same GPU. Runs only where TensorRT is installed (and a GPU is there); elsewhere every test
here is skipped, and test_onnx_numerics.py checks the same graphs in onnxruntime.

Tolerances (max |a - b| / max |a| of teacher-forced logits): float32 1e-3 (TensorRT picks its own
GEMM and reduction kernels; TF32 is off), bf16 3e-2 (its rounding at every op), FP8 5e-2."""

from __future__ import annotations

import json

import pytest
import torch
from models import make_hf_model
from quantized_checkpoints import quantize_checkpoint

from trtc.backends import tensorrt
from trtc.compiler.build import build
from trtc.compiler.build_tensorrt import build_from_onnx
from trtc.converters.convert import convert
from trtc.formats.build_config import BuildConfig
from trtc.runtime.executor import Executor
from trtc.runtime.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.gpu,
    pytest.mark.skipif(not tensorrt.available(), reason="TensorRT is not installed (import tensorrt failed)"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
LIMITS = BuildConfig(tokens_per_block=16, max_seq_len=128, max_num_tokens=64, max_batch_size=4)
PROMPTS = [[1, *range(5, 45)], [1, *range(50, 62)], [1, 7, 8]]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def engines(tmp_path, dtype: str, quant=None):
    hf = make_hf_model(tmp_path / "hf", "llama3_gqa", hidden_size=128, intermediate_size=256)
    ckpt = convert(hf, tmp_path / "ckpt", dtype=dtype, progress=False)
    if quant is not None:
        ckpt = quantize_checkpoint(ckpt, tmp_path / "qckpt", *quant)
    cuda = build(ckpt, tmp_path / "cuda", LIMITS, backend="cuda", progress=False)
    trt = build(ckpt, tmp_path / "trt", LIMITS, backend="tensorrt", progress=False)
    return cuda, trt


@pytest.mark.parametrize("dtype, quant, tol", [("float32", None, 1e-3), ("bfloat16", None, 3e-2),
                                               ("bfloat16", ("FP8", True), 5e-2),
                                               ("bfloat16", ("W4A16_AWQ", False, 32, True), 3e-2)])
def test_plans_match_cuda_backend(tmp_path, dtype, quant, tol):
    cuda, trt = engines(tmp_path, dtype, quant)
    config = json.loads((trt / "config.json").read_text())
    assert config["backend"] == "tensorrt" and config["tensorrt"]["strongly_typed"]
    assert (trt / "rank0.engine").is_file() and (trt / "timing.cache").is_file()
    want = Executor(cuda, kv_cache_max_tokens=1024).prompt_logits(PROMPTS)
    got = Executor(trt, kv_cache_max_tokens=1024).prompt_logits(PROMPTS)
    for g, w in zip(got, want):
        assert rel(g, w) < tol


def test_greedy_tokens_and_rebuild_from_onnx(tmp_path):
    cuda, trt = engines(tmp_path, "float32")
    params = SamplingParams(max_tokens=16)

    def greedy(engine):
        ex = Executor(engine, kv_cache_max_tokens=1024)
        ids = [ex.add_request(p, params) for p in PROMPTS]
        outputs = {i: [] for i in ids}
        while ex.has_unfinished():
            for event in ex.step():
                if event.token_id is not None:
                    outputs[event.request_id].append(event.token_id)
        return [outputs[i] for i in ids]

    assert greedy(trt) == greedy(cuda)
    rebuilt = build_from_onnx(trt, tmp_path / "rebuilt", {"max_batch_size": 2})  # seeded by trt/timing.cache
    assert json.loads((rebuilt / "config.json").read_text())["build_config"]["max_batch_size"] == 2
    assert greedy(rebuilt)[:1] == greedy(cuda)[:1]
