"""LLM.close() gives back every byte of device memory the engine took (weights, KV pool, CUDA graphs,
split-K workspaces, grammar masks, RoPE tables), after generation that used all of them: the
allocator's count returns to its value before load, and the caching allocator holds nothing more
than before (skipped without a GPU)."""

from __future__ import annotations

import asyncio
import gc

import pytest
import torch

from trtc.compiler.build import build_from_hf
from trtc.llm import LLM
from trtc.runtime.sampling_params import GuidedDecodingParams, SamplingParams

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def _settled() -> tuple[int, int]:
    gc.collect()
    torch.cuda.synchronize()
    torch._C._cuda_clearCublasWorkspaces()  # cuBLAS's per-stream workspaces, as close() frees them
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()


@pytest.mark.parametrize("use_async", [False, True])
def test_close_gives_back_all_device_memory(fixtures_dir, tmp_path, use_async):
    engine = build_from_hf(fixtures_dir / "stories260K", tmp_path / "engine", dtype="bfloat16", progress=False)
    allocated, reserved = _settled()
    llm = LLM(engine, kv_cache_free_gpu_memory_fraction=0.3)
    params = [SamplingParams(max_tokens=16), SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=1,
                                                             logprobs=True, top_logprobs=3),
              SamplingParams(max_tokens=16, guided_decoding=GuidedDecodingParams(regex="[a-z ]+"))]
    prompts = ["Once upon a time"] * 3
    if use_async:
        async def main():
            return await asyncio.gather(*[llm.generate_async(p, sp) for p, sp in zip(prompts, params)])

        outs = asyncio.run(main())
    else:
        outs = llm.generate(prompts, params)  # decode steps replay CUDA graphs
    assert all(len(o.token_ids) > 0 for o in outs)
    assert torch.cuda.memory_allocated() > allocated
    llm.close()
    after_allocated, after_reserved = _settled()
    assert after_allocated == allocated, f"{(after_allocated - allocated) / 2**20:.1f} MiB still allocated"
    assert after_reserved <= reserved, f"{(after_reserved - reserved) / 2**20:.1f} MiB still reserved"
