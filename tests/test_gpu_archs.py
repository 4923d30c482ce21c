"""Every architecture's engine on a GPU against HF transformers on the same GPU (skipped without
one): the Triton kernels with each feature of the layer graph's vocabulary (soft-caps, per-layer
windows and RoPE, partial rotary, LongRoPE, GeGLU, squared ReLU, q/k norms, no-RoPE layers,
mixtures of experts with and without a shared expert).

* fp32 engines: greedy tokens equal HF `generate` (32 tokens; prompts prefilled in chunks over
  small blocks, decode through CUDA graphs);
* bf16 engines: teacher-forced logits within 3e-2 relative (norm-wise) of HF's in bf16 (a bf16
  router may pick other experts than a float32 one), and decode through CUDA graphs gives the
  tokens of eager decode.
"""

from __future__ import annotations

import pytest
import torch
from models import CASES, MOE_CASES, make_hf_model
from transformers import AutoModelForCausalLM

from trtc.compiler.build import build_from_hf
from trtc.formats.build_config import BuildConfig
from trtc.llm import LLM
from trtc.runtime.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

ALL = [*CASES, *MOE_CASES]
CONFIG = BuildConfig(max_batch_size=4, max_num_tokens=16, tokens_per_block=4, max_seq_len=96)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 131, (n,), generator=g).tolist() for n in (3, 9, 21)]


def hf_model(hf_dir):
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager",
                                                device_map="cuda").eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_archs")
    return {case: make_hf_model(root / case, case) for case in ALL}


@pytest.mark.parametrize("case", ALL)
def test_fp32_greedy_equals_hf_on_gpu(case, hf_dirs, tmp_path):
    hf_dir = hf_dirs[case]
    hf = hf_model(hf_dir)
    with torch.no_grad():
        want = [hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=32, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(p):].tolist() for p in prompts()]
    engine = build_from_hf(hf_dir, tmp_path / "engine", dtype="float32", build_config=CONFIG, progress=False)
    with LLM(engine) as llm:
        assert llm.executor.device.type == "cuda"
        got = [o.token_ids for o in llm.generate(prompts(), SamplingParams(max_tokens=32, end_id=-1))]
    assert got == want


@pytest.mark.parametrize("case", ALL)
def test_bf16_logits_follow_hf_on_gpu(case, hf_dirs, tmp_path):
    hf_dir = hf_dirs[case]
    prompt = prompts()[2]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16, attn_implementation="eager",
                                              device_map="cuda").eval()
    with torch.no_grad():
        want = hf(torch.tensor([prompt], device="cuda")).logits[0].float()  # [T, vocab]
    engine = build_from_hf(hf_dir, tmp_path / "engine", dtype="bfloat16", build_config=CONFIG, progress=False)
    params = SamplingParams(max_tokens=16, end_id=-1)
    with LLM(engine, enable_prefix_reuse=False) as llm:
        got = llm.executor.prompt_logits([prompt])[0]  # [T, vocab] f32, prefilled in two chunks
        err = ((got - want).norm() / want.norm()).item()
        assert err < 3e-2, f"{case}: bf16 logits {err:.2e} from HF's bf16"
        graphed = [o.token_ids for o in llm.generate(prompts(), params)]
    with LLM(engine, enable_cuda_graphs=False) as llm:
        assert graphed == [o.token_ids for o in llm.generate(prompts(), params)]
