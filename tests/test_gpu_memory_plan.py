"""The memory plan on a GPU (skipped without one): at the default free_gpu_memory_fraction 0.9, 2,000
requests at 256 in flight, of mixed lengths and sampling (greedy, top-p/top-k/min-p with penalties,
seeded, logprobs with top-5 alternatives), end with 0 errors, each request with all its tokens, and
PyTorch's peak allocated memory over the run stays within the plan (weights + KV pool + what the pool
was sized to leave for the steps). A small model shape with Llama 3's 128K vocabulary, so that the
logits and the sampler weigh what they weigh on an 8B model."""

from __future__ import annotations

import random

import pytest
import torch

from trtc.compiler.build import build_from_hf
from trtc.formats.build_config import BuildConfig
from trtc.runtime.executor import Executor
from trtc.runtime.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

SHAPE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=128256, max_position_embeddings=4096, rms_norm_eps=1e-5,
             bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False)
REQUESTS, CONCURRENCY = 2000, 256


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("gpu-plan")
    config = LlamaConfig(**SHAPE)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root / "hf")
    del model
    torch.cuda.empty_cache()
    return build_from_hf(root / "hf", root / "engine", dtype="bfloat16", progress=False, build_config=BuildConfig(
        max_batch_size=256, max_num_tokens=8192, max_seq_len=1024))


def _params(i: int, osl: int) -> SamplingParams:
    kind = i % 4
    if kind == 0:
        return SamplingParams(max_tokens=osl, end_id=-1)
    if kind == 1:
        return SamplingParams(max_tokens=osl, end_id=-1, temperature=0.8, top_p=0.9, top_k=50, min_p=0.02,
                              repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.1, seed=i)
    if kind == 2:
        return SamplingParams(max_tokens=osl, end_id=-1, temperature=1.0, logprobs=True, top_logprobs=5)
    return SamplingParams(max_tokens=osl, end_id=-1, logprobs=True)


def test_peak_within_the_plan_at_256_in_flight_and_no_errors(engine):
    ex = Executor(engine)  # the default fraction, 0.9
    try:
        print(ex.worker.memory_line())
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        rng = random.Random(0)
        pending = [(rng.randint(16, 600), rng.randint(16, 128)) for _ in range(REQUESTS)][::-1]
        counts, wanted, reasons, errors, in_flight = {}, {}, {}, [], 0
        while pending or ex.has_unfinished():
            while pending and in_flight < CONCURRENCY:
                isl, osl = pending.pop()
                prompt = [rng.randint(100, SHAPE["vocab_size"] - 1) for _ in range(isl)]
                rid = ex.add_request(prompt, _params(len(wanted), osl))
                wanted[rid], counts[rid] = osl, 0
                in_flight += 1
            try:
                events = ex.step()
            except Exception as e:  # noqa: BLE001 - counted, then the test fails on them
                errors.append(repr(e))
                break
            for e in events:
                if e.token_id is not None:
                    counts[e.request_id] += 1
                if e.finish_reason is not None:
                    reasons[e.request_id] = e.finish_reason
                    in_flight -= 1
        torch.cuda.synchronize()
        peak, plan = torch.cuda.max_memory_allocated(), ex.worker.memory_budget()
        print(f"peak allocated {peak / 2**30:.2f} GiB, plan {plan / 2**30:.2f} GiB, "
              f"reserved {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB")
        assert errors == []
        assert len(reasons) == REQUESTS and set(reasons.values()) == {"length"}
        assert all(counts[r] == wanted[r] for r in wanted)
        assert peak <= plan, f"peak {peak} > plan {plan}; {ex.worker.memory_line()}\n{torch.cuda.memory_summary()}"
        assert torch.cuda.mem_get_info()[0] > 0
    finally:
        ex.close()


def test_graphs_take_one_pool_whatever_the_sizes(engine):
    """The captured graphs share one pool and one logits buffer: their memory is within the plan's
    graphs figure, and no more than the profile run's capture of the largest size plus a margin."""
    ex = Executor(engine)
    try:
        graphs = ex.worker.cuda_graphs
        assert graphs is not None and len(graphs.sizes) == 20
        assert graphs.memory_bytes <= max(ex.worker.plan.graphs, ex.worker.peaks.graphs) * 1.25, ex.worker.memory_line()
    finally:
        ex.close()
