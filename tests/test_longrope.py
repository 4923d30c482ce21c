"""LongRoPE (Phi-3) across its original context: `trtc build` + `trtc run` greedy equals HF `generate`
token for token, each sequence with its own factors whatever it is batched with (trtc/runtime/longrope.py).

HF's generate drops the KV cache at the step where a sequence reaches original_max_position_embeddings
+ 1 tokens and recomputes it with the long factors; a prompt already past it is long from the start.
The prompts below cover: short prompts that cross during decoding (one at the first decode step),
and a prompt past the context whose prefill is chunked (max_num_tokens 16), all in one batch.
"""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import cli
from models import CASES, add_word_tokenizer, load_hf, make_hf_model, text_of

from trtc.compiler.build import build_from_hf
from trtc.formats.build_config import BuildConfig
from trtc.llm import LLM
from trtc.runtime.sampling_params import SamplingParams

CONTEXT = 12  # original_max_position_embeddings
NEW_TOKENS = 32
PROMPT_WORDS = (2, 8, 11, 20)  # + BOS: 3, 9, 12 (crosses at its first decode) and 21 tokens (long from the start)


def hf_generate(model, prompt_ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    root = tmp_path_factory.mktemp("longrope")
    params = {**CASES["phi3"][1]["rope_parameters"], "original_max_position_embeddings": CONTEXT}
    hf_dir = add_word_tokenizer(make_hf_model(root / "hf", "phi3", original_max_position_embeddings=CONTEXT,
                                              rope_parameters=params))
    result = cli("build", "--model_dir", hf_dir, "--output_dir", root / "engine", "--tokens_per_block", 4,
                 "--max_num_tokens", 16, "--max_batch_size", 4)
    assert result.exit_code == 0, result.output
    g = torch.Generator().manual_seed(5)
    prompts = [text_of(torch.randint(3, 131, (n,), generator=g).tolist()) for n in PROMPT_WORDS]
    return hf_dir, root / "engine", prompts


def test_run_equals_hf_generate_across_the_context(phi3, tmp_path):
    hf_dir, engine, prompts = phi3
    result = cli("run", "--engine_dir", engine, "--input_text", *prompts, "--max_output_len", NEW_TOKENS,
                 "--end_id", -1, "--output_json", tmp_path / "out.json")
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "out.json").read_text())
    assert [len(r["input_ids"]) for r in records] == [n + 1 for n in PROMPT_WORDS]
    model = load_hf(hf_dir)
    for record in records:
        assert record["output_ids"] == hf_generate(model, record["input_ids"])


def test_preempted_sequences_keep_their_tokens(phi3):
    """A KV pool of 16 blocks (64 tokens) for four sequences of 35 to 53: sequences are preempted and
    recomputed (before and after crossing the context), and every output is still HF's."""
    hf_dir, engine, prompts = phi3
    model = load_hf(hf_dir)
    with LLM(engine, kv_cache_max_tokens=64) as llm:
        outputs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, end_id=-1))
        preemptions = llm.executor.scheduler.stats()["num_preemptions"]
    assert preemptions > 0
    for output in outputs:
        assert output.token_ids == hf_generate(model, output.prompt_token_ids)


def test_tp2_equals_hf_generate_across_the_context(phi3, tmp_path):
    """Two ranks (gloo): the recompute steps reach every rank, as any step does."""
    hf_dir, _, _ = phi3
    engine = build_from_hf(hf_dir, tmp_path / "tp2", tp_size=2, build_config=BuildConfig(
        max_batch_size=4, max_num_tokens=16, tokens_per_block=4, max_seq_len=96), progress=False)
    prompts = [[1, 5, 6], [1, *range(10, 30)]]  # crosses while decoding; long from the start
    with LLM(engine, kv_cache_max_tokens=512) as llm:
        outputs = llm.generate(prompts, SamplingParams(max_tokens=24, end_id=-1))
    model = load_hf(hf_dir)
    for p, output in zip(prompts, outputs):
        assert output.token_ids == hf_generate(model, p, 24)
