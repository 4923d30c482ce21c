"""In-flight batching with chunked prefill and preemption changes no token on the architectures beyond
the Llama family (sliding / global layers, soft-caps, q/k norms, partial rotary, LongRoPE, post-norms):
a pool that forces preemption (the scheduler's num_preemptions says it happened) gives the tokens of
a pool large enough for all, and both are HF's greedy `generate` of each prompt alone."""

from __future__ import annotations

import pytest
import torch
from models import load_hf, make_hf_model

from trtc.compiler.build import build_from_hf
from trtc.formats.build_config import BuildConfig
from trtc.llm import LLM
from trtc.runtime.sampling_params import SamplingParams

ARCHS = ["gemma2", "phi3", "gemma3", "nemotron", "exaone4"]
GREEDY = SamplingParams(max_tokens=16, end_id=-1)
SMALL_POOL = 64  # 16 blocks of 4: the longest request (39 + 16 tokens) fits alone, the eight together do not


def prompts(n: int = 8) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 131, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def generate(engine, pool: int) -> tuple[list[list[int]], int]:
    with LLM(engine, kv_cache_max_tokens=pool) as llm:
        tokens = [o.token_ids for o in llm.generate(prompts(), GREEDY)]
        return tokens, llm.executor.scheduler.stats()["num_preemptions"]


@pytest.mark.parametrize("arch", ARCHS)
def test_preemption_changes_no_token(arch, tmp_path):
    hf = make_hf_model(tmp_path / "hf", arch)
    engine = build_from_hf(hf, tmp_path / "engine", build_config=BuildConfig(
        max_batch_size=8, max_num_tokens=16, tokens_per_block=4, max_seq_len=96), progress=False)
    roomy, none = generate(engine, 4096)
    tight, preemptions = generate(engine, SMALL_POOL)
    assert none == 0 and preemptions > 0, (none, preemptions)
    assert tight == roomy
    model = load_hf(hf)
    for p, got in zip(prompts(), roomy):
        with torch.no_grad():
            want = model.generate(torch.tensor([p]), max_new_tokens=GREEDY.max_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert got == want
