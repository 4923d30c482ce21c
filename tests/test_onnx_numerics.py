"""The tensorrt backend's ONNX graphs compute what the cuda backend computes.

Each graph runs in onnxruntime (CPU) with its trtc nodes given their reference implementations
(tests/oracles/ort_runner.py), beside the cuda backend's model runner, on the exact inputs of every
step the executor schedules: prefill chunks (max_num_tokens 24 splits the 30-token prompt), decode
steps and both mixed, over the same paged KV-cache block tables. The model runner's logits drive
the run; the graph's are compared with them step by step.

Tolerances, max |a - b| / max |a| of a step's logits:
  * float32 graph vs float32 runner: 1e-4. Both compute in float32 in another order (onnxruntime's
    GEMMs and reductions against torch's); observed <= 3e-6.
  * FP8 W8A8 and FP8 KV cache: 1e-3, since activations (and K, V) are quantized to FP8: a value one
    float32 ulp away can round to the neighbouring FP8 value; observed <= 5e-7 for W8A8, 4.2e-5 with
    only the KV cache in FP8.
  * INT4 weight-only (AWQ with zero points and pre-quant scales, symmetric, GPTQ act-order): 1e-4;
    observed <= 5e-6.
  * a bf16 model: onnxruntime's CPU kernels lack bfloat16 (Gemm, Mul, Add, Sigmoid: "Could not
    find an implementation"), so its graph is exported in float32 (the same lowering, weights
    widened exactly) and compared with the runner on the float32 engine of the same weights (1e-4)
    and on the bf16 engine (3e-2: bf16 rounds to 8 bits at every op); observed 1.2e-6 and 8.6e-3.
"""

from __future__ import annotations

import json

import pytest
import torch
from models import CASES, make_hf_model
from oracles.ort_runner import OnnxRuntimeRunner, TensorParallelOnnxRuntimeRunner
from quantized_checkpoints import quantize_checkpoint

from trtc.compiler.build import build
from trtc.converters.convert import convert
from trtc.formats.build_config import BuildConfig
from trtc.formats.checkpoint import CheckpointConfig
from trtc.formats.engine import Engine
from trtc.formats.rank_tensors import checkpoint_rank, engine_rank
from trtc.onnx.export import write_onnx_dir
from trtc.runtime.executor import Executor
from trtc.runtime.model_runner import ModelRunner
from trtc.runtime.sampling_params import SamplingParams

LIMITS = dict(tokens_per_block=4, max_seq_len=64, max_num_tokens=24, max_batch_size=4)
FP32, FP8, BF16 = 1e-4, 1e-3, 3e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class Compare:
    """The executor's runner, with `others` run on each step's inputs. logits[step] holds the
    runner's then each other's; errors[step][j] is other j's error against the runner."""

    def __init__(self, runner, others: list) -> None:
        self.runner, self.others, self.logits, self.tokens = runner, others, [], []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        for r in [self.runner, *self.others]:
            r.allocate_kv_cache(num_blocks)

    def forward(self, input_ids, meta, logits_indices):
        want = self.runner.forward(input_ids, meta, logits_indices)
        self.logits.append([want] + [other.forward(input_ids, meta, logits_indices) for other in self.others])
        self.tokens.append((len(input_ids), len(meta.query_lens)))
        return want

    @property
    def errors(self) -> list[list[float]]:
        return [[rel(other, want) for other in others] for want, *others in self.logits]


def run_compared(engine_dir, others, vocab: int, prompt_len: int = 30, max_tokens: int = 6) -> Compare:
    """Three requests (one longer than a step's token budget, one sharing its first blocks) to the end."""
    ex = Executor(engine_dir, kv_cache_max_tokens=256)
    ex.worker.runner = Compare(ex.runner, others)  # the worker runs rank 0's forward
    ex.runner.allocate_kv_cache(ex.num_blocks)
    g = torch.Generator().manual_seed(0)
    long = [1] + torch.randint(3, vocab, (prompt_len - 1,), generator=g).tolist()
    for prompt in (long[:9], long, long[:17] + [5, 6, 7]):
        ex.add_request(prompt, SamplingParams(max_tokens=max_tokens))
    ex.run_until_complete()
    print(f"{engine_dir}: max error per runner {[max(e) for e in zip(*ex.runner.errors)]} over {len(ex.runner.tokens)} steps")
    steps = ex.runner.tokens
    assert any(t > b for t, b in steps) and any(t == b for t, b in steps)  # prefill and decode steps
    assert len(steps) >= max_tokens
    return ex.runner


def onnx_runner(engine_dir, out, dtype: str | None = None):
    """Lower the engine's tensors (as built) into `out`; the onnxruntime runner of its graph."""
    engine = Engine.load(engine_dir)
    ckpt = engine.pretrained
    write_onnx_dir(out, ckpt, engine.build_config, lambda rank: engine_rank(engine_dir, rank), dtype)
    return OnnxRuntimeRunner(out, ckpt.graph, ckpt.mapping, engine.build_config)


def make_engine(tmp_path, case="llama3_gqa", quant=None, **hf_overrides):
    hf = make_hf_model(tmp_path / "hf", case, **hf_overrides)
    ckpt = convert(hf, tmp_path / "ckpt", progress=False)
    if quant is not None:
        ckpt = quantize_checkpoint(ckpt, tmp_path / "qckpt", *quant)
    return build(ckpt, tmp_path / "engine", BuildConfig(**LIMITS), progress=False)


@pytest.mark.parametrize("case", CASES)
def test_float32_graph_matches_model_runner(case, tmp_path):
    engine = make_engine(tmp_path, case)
    run = run_compared(engine, [onnx_runner(engine, tmp_path / "onnx")], 131)
    assert max(e for (e,) in run.errors) < FP32, run.errors


def test_every_graph_branch(tmp_path):
    """What no converter produces yet, edited into a graph: dynamic NTK RoPE past
    max_position_embeddings, LayerNorm, a +1 norm offset, GELU (exact and tanh), soft-cap."""
    engine = make_engine(tmp_path, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
                         max_position_embeddings=16)
    path = engine / "config.json"
    d = json.loads(path.read_text())
    layers = d["pretrained_config"]["graph"]["layers"]
    layers[0]["input_norm"]["kind"] = d["pretrained_config"]["graph"]["final_norm"]["kind"] = "layer"
    layers[1]["post_attention_norm"]["offset"] = 1.0
    layers[0]["mlp"]["activation"], layers[1]["mlp"]["activation"] = "gelu_tanh", "gelu"
    layers[0]["attention"]["soft_cap"], layers[1]["attention"]["sliding_window"] = 5.0, 5
    path.write_text(json.dumps(d))
    run = run_compared(engine, [onnx_runner(engine, tmp_path / "onnx")], 131)
    assert max(e for (e,) in run.errors) < FP32, run.errors


QUANT = {
    "fp8": (("FP8", False), FP8),
    "fp8_fp8kv": (("FP8", True), FP8),
    "fp8kv_only": ((None, True), FP8),  # K and V are quantized to FP8 like activations; observed 4e-5
    "int4_awq_zero_point": (("W4A16_AWQ", False, 32, True), FP32),
    "int4_symmetric": (("W4A16_AWQ", False, 64, False), FP32),
    "int4_gptq_act_order": (("W4A16_GPTQ", False, 32, True), FP32),  # the permutation: a Gather before the GEMM
}


@pytest.mark.parametrize("case", QUANT)
def test_quantized_graph_matches_model_runner(case, tmp_path):
    quant, tol = QUANT[case]
    engine = make_engine(tmp_path, quant=quant, hidden_size=128, intermediate_size=256)
    run = run_compared(engine, [onnx_runner(engine, tmp_path / "onnx")], 131)
    assert max(e for (e,) in run.errors) < tol, run.errors


@pytest.mark.parametrize("case", ["llama2_tied_bias", "qwen3_qknorm"])
def test_tensor_parallel_graphs_match_one_rank(case, tmp_path):
    """tp 2 (vocab-parallel embedding and LM head of an odd vocab, AllReduce after o and down; one KV
    head replicated for qwen3): both ranks' graphs in threads against the tp 1 model runner."""
    engine = make_engine(tmp_path, case)
    ckpt2 = convert(tmp_path / "hf", tmp_path / "ckpt_tp2", tp_size=2, progress=False)
    cfg = CheckpointConfig.load(ckpt2)
    bc = Engine.load(engine).build_config
    write_onnx_dir(tmp_path / "onnx", cfg, bc, lambda rank: checkpoint_rank(ckpt2, rank, cfg.graph))
    run = run_compared(engine, [TensorParallelOnnxRuntimeRunner(tmp_path / "onnx", cfg.graph, cfg.mapping, bc)], 131)
    assert max(e for (e,) in run.errors) < FP32, run.errors


def test_fixture_stories260k(fixtures_dir, tmp_path):
    ckpt = convert(fixtures_dir / "stories260K", tmp_path / "ckpt", progress=False)
    engine = build(ckpt, tmp_path / "engine", BuildConfig(**LIMITS), progress=False)
    run = run_compared(engine, [onnx_runner(engine, tmp_path / "onnx")], 512)
    assert max(e for (e,) in run.errors) < FP32, run.errors


def test_fixture_books16m_bf16(fixtures_dir, tmp_path):
    """The bf16 model: its float32 graph against the bf16 runner (which drives the run) and the
    float32 runner of the same weights."""
    hf = fixtures_dir / "books-16M"
    limits = BuildConfig(**{**LIMITS, "tokens_per_block": 16})
    bf16 = build(convert(hf, tmp_path / "ckpt", progress=False), tmp_path / "engine", limits, progress=False)
    fp32 = build(convert(hf, tmp_path / "ckpt32", dtype="float32", progress=False), tmp_path / "engine32", limits,
                 progress=False)
    graph = onnx_runner(bf16, tmp_path / "onnx", dtype="float32")
    run = run_compared(bf16, [graph, ModelRunner(Engine.load(fp32), torch.device("cpu"))], 8192, 40, max_tokens=4)
    assert max(max(e) for e in run.errors) < BF16, run.errors
    assert max(rel(g, r32) for _, g, r32 in run.logits) < FP32
