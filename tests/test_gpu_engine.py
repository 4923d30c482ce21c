"""The engine on a GPU against HF transformers on the same GPU (skipped without one).

* fp32: greedy tokens equal HF `generate` exactly on the fixture models;
* bf16: teacher-forced top-1 agreement with HF >= 99% over 1,000+ tokens of real text;
* decode through CUDA graphs gives the tokens of eager decode.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trtc.compiler.build import build_from_hf
from trtc.llm import LLM
from trtc.runtime.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def hf_generate(hf_dir, dtype, ids, n):
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, device_map="cuda").eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("model", ["stories260K", "books-16M"])
def test_fp32_greedy_equals_hf_on_gpu(fixtures_dir, tmp_path, model):
    hf_dir = fixtures_dir / model
    engine = build_from_hf(hf_dir, tmp_path / "engine", dtype="float32", progress=False)
    llm = LLM(engine)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    for prompt in ["Once upon a time", "It was a dark and stormy night"]:
        ids = tok(prompt).input_ids
        ours = llm.generate(ids, SamplingParams(max_tokens=64, end_id=-1)).token_ids
        assert ours == hf_generate(hf_dir, torch.float32, ids, 64)


def test_bf16_teacher_forced_agreement(fixtures_dir, tmp_path):
    hf_dir = fixtures_dir / "books-16M"
    engine = build_from_hf(hf_dir, tmp_path / "engine", dtype="bfloat16", progress=False)
    llm = LLM(engine)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    text = (fixtures_dir / "text" / "alice_in_wonderland.txt").read_text()[5000:40000]
    ids = tok(text).input_ids
    windows = [ids[i : i + 512] for i in range(0, 3 * 512, 512)]  # 1,536 positions
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16, device_map="cuda").eval()
    agree = total = 0
    for w in windows:
        with torch.no_grad():
            hf_top1 = model(torch.tensor([w], device="cuda")).logits[0].argmax(-1)
        ours = llm.executor.prompt_logits([w])[0].argmax(-1)  # [len(w), vocab] teacher-forced
        agree += int((ours == hf_top1).sum())
        total += len(w)
    assert total >= 1000 and agree / total >= 0.99, f"top-1 agreement {agree}/{total}"


def test_cuda_graph_decode_equals_eager(fixtures_dir, tmp_path):
    hf_dir = fixtures_dir / "books-16M"
    engine = build_from_hf(hf_dir, tmp_path / "engine", dtype="bfloat16", progress=False)
    prompts = [[1] + list(range(100 + 7 * i, 100 + 7 * i + 20 + 13 * i)) for i in range(5)]
    params = SamplingParams(max_tokens=40, end_id=-1)
    graphs = LLM(engine).generate(prompts, params)
    eager = LLM(engine, enable_cuda_graphs=False).generate(prompts, params)
    assert [o.token_ids for o in graphs] == [o.token_ids for o in eager]
