"""Prompt logprobs (SamplingParams.prompt_logprobs) on CPU: each prompt token's logprob, rank and the
top N equal HF's log_softmax of the prompt, through chunked prefill, past a prefix-cache hit and
under tensor parallelism; `trtc eval`'s perplexity is the same scoring."""

from __future__ import annotations

import math

import pytest
import torch
from models import load_hf, make_hf_model

from trtc.compiler.build import build_from_hf
from trtc.formats.build_config import BuildConfig
from trtc.llm import LLM
from trtc.runtime.executor import Executor
from trtc.runtime.sampling_params import SamplingParams

TOL = 1e-4


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("plp")
    hf = make_hf_model(root / "hf", "llama3_gqa")
    return build_from_hf(hf, root / "engine", build_config=BuildConfig(
        max_batch_size=4, max_num_tokens=16, tokens_per_block=4, max_seq_len=96), dtype="float32", progress=False)


@pytest.fixture(scope="module")
def hf_model(engine):
    return load_hf(engine.parent / "hf").float()


def prompt_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 131, (n,), generator=g).tolist()


def hf_log_softmax(hf_model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt), vocab]: row j is the distribution of token j + 1."""
    with torch.no_grad():
        return hf_model(torch.tensor([prompt])).logits[0].double().log_softmax(-1)


def check(scored, prompt: list[int], want: torch.Tensor, top_n: int) -> None:
    assert len(scored) == len(prompt) and scored[0] is None
    for j, (token, entry) in enumerate(zip(prompt[1:], scored[1:])):
        row = want[j]
        assert next(iter(entry)) == token  # the prompt's token first
        assert abs(entry[token].logprob - float(row[token])) < TOL, j
        assert entry[token].rank == int((row >= row[token]).sum())
        values, ids = row.topk(top_n)
        top = [(t, lp) for t, lp in entry.items() if lp.rank <= top_n]
        assert len(entry) == top_n + (entry[token].rank > top_n)
        assert sorted(t for t, _ in top) == sorted(ids.tolist())
        for t, lp in top:
            assert abs(lp.logprob - float(row[t])) < TOL


def test_prompt_logprobs_equal_hf_through_chunked_prefill(engine, hf_model):
    """A 40-token prompt prefilled in 16-token chunks, a 16-token one, and one of 2 tokens, batched
    together: every prompt token's logprob, rank and top 5 are HF's; the generated token is too."""
    ex = Executor(engine, kv_cache_max_tokens=512)
    prompts = [prompt_of(40, 1), prompt_of(16, 2), prompt_of(2, 3)]
    scored = ex.score(prompts, top_n=5)
    for prompt, s in zip(prompts, scored):
        check(s, prompt, hf_log_softmax(hf_model, prompt), 5)


def test_prompt_logprobs_zero_gives_the_prompt_tokens_only(engine, hf_model):
    prompt = prompt_of(30, 4)
    out = LLM(engine).generate(prompt, SamplingParams(max_tokens=3, end_id=-1, prompt_logprobs=0, logprobs=True))
    want = hf_log_softmax(hf_model, prompt)
    assert out.prompt_logprobs[0] is None
    for j, (token, entry) in enumerate(zip(prompt[1:], out.prompt_logprobs[1:])):
        assert len(entry) == 1 and abs(entry[token].logprob - float(want[j, token])) < TOL
    assert abs(out.outputs[0].logprobs[0] - float(want[-1].max())) < TOL  # the same log_softmax, greedy
    assert out.num_cached_tokens == 0


def test_prompt_logprobs_after_a_prefix_cache_hit(engine, hf_model):
    """A second request on a prompt whose blocks are cached takes them (num_cached_tokens), yet a
    request asking for prompt logprobs computes its whole prompt and gets every position right."""
    ex_llm = LLM(engine)
    prompt = prompt_of(37, 5)
    ex_llm.generate(prompt, SamplingParams(max_tokens=1))
    reused = ex_llm.generate(prompt, SamplingParams(max_tokens=1))
    assert reused.num_cached_tokens == 36  # the 9 full blocks before the last token
    extended = prompt + prompt_of(8, 6)
    out = ex_llm.generate(extended, SamplingParams(max_tokens=1, prompt_logprobs=2))
    assert out.num_cached_tokens == 0
    check(out.prompt_logprobs, extended, hf_log_softmax(hf_model, extended), 2)
    again = ex_llm.generate(extended, SamplingParams(max_tokens=1))  # reuse is back for requests not scoring
    assert again.num_cached_tokens >= 36


def test_prompt_logprobs_survive_preemption(engine, hf_model):
    """A 12-block pool for three 20-token prompts generating 20 tokens each: requests are preempted
    and recompute; each prompt's logprobs are still scored once and right."""
    ex = Executor(engine, kv_cache_max_tokens=48)
    prompts = [prompt_of(20, 10 + i) for i in range(3)]
    params = SamplingParams(max_tokens=20, end_id=-1, prompt_logprobs=1)
    got = {}
    rids = [ex.add_request(p, params, on_event=lambda e: got.setdefault(e.request_id, e.prompt_logprobs))
            for p in prompts]
    ex.run_until_complete()
    assert ex.scheduler.stats()["num_preemptions"] > 0
    for rid, p in zip(rids, prompts):
        check(got[rid], p, hf_log_softmax(hf_model, p), 1)


def test_perplexity_is_the_prompt_logprobs_sum(engine, hf_model):
    """`trtc eval`'s perplexity scores through Executor.score: its NLL is HF's summed over the windows."""
    from trtc.tools.perplexity import perplexity

    ids = prompt_of(70, 7)
    r = perplexity(Executor(engine, kv_cache_max_tokens=512), ids, window_len=32, bos=1)
    nll = 0.0
    for start in range(0, len(ids), 31):
        w = [1] + ids[start : start + 31]
        lp = hf_log_softmax(hf_model, w)
        nll -= float(lp[:-1].gather(1, torch.tensor(w[1:])[:, None]).sum())
    assert r.tokens == 70 and math.isclose(r.nll, nll, rel_tol=1e-5)


def test_prompt_logprobs_out_of_range():
    with pytest.raises(ValueError, match=r"prompt_logprobs must be in \[0, 20\], got 21"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(ValueError, match="prompt_logprobs must be an integer >= 0"):
        SamplingParams(prompt_logprobs=-1)
