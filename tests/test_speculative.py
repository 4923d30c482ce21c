"""Speculative decoding (n-gram prompt lookup): greedy output equal to the engine without speculation token
for token (stories260K, books-16M), the sampled distribution equal to the target's (a chi-square test over
thousands of seeded requests on a tiny random model), rejected tokens' KV blocks given back, and the
sampling processors, stop conditions and prefix reuse unchanged."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from conftest import FIXTURES
from models import make_hf_model
from scipy.stats import chi2_contingency

from trtc import LLM, SamplingParams, SpeculativeConfig, TrtcError
from trtc.compiler.build import build_from_hf
from trtc.formats.build_config import BuildConfig
from trtc.runtime.speculative import ngram_draft

REPEATING = "The dog ran to the park. The dog ran to the park. The dog ran to the"


def fixture(name: str):
    path = FIXTURES / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    bc = BuildConfig(max_batch_size=8, max_seq_len=512)
    return {name: build_from_hf(fixture(name), root / name, build_config=bc, progress=False)
            for name in ("stories260K", "books-16M")}


def test_ngram_draft_takes_the_latest_longest_match():
    tokens = np.asarray([5, 6, 7, 8, 1, 6, 7, 9, 2, 6, 7])
    assert ngram_draft(tokens, 3, 1, 3) == [9, 2, 6]  # "6 7" last seen before at 5..6, followed by 9 2 6
    assert ngram_draft(np.asarray([1, 2, 3, 4]), 3, 1, 3) == []
    assert ngram_draft(np.asarray([4, 1, 2, 4]), 2, 1, 3) == [1, 2]
    with pytest.raises(TrtcError, match="max_draft_len"):
        SpeculativeConfig(max_draft_len=0)
    with pytest.raises(TrtcError, match="ngram"):
        SpeculativeConfig(mode="eagle9")


@pytest.mark.parametrize("name", ["stories260K", "books-16M"])
def test_greedy_equals_the_engine_without_speculation(engines, name):
    prompts = [REPEATING, "Once upon a time", "She said: yes, yes, yes, yes"]
    params = SamplingParams(max_tokens=96, end_id=-1)
    with LLM(engines[name]) as llm:
        want = [o.token_ids for o in llm.generate(prompts, params)]
        plain_steps = llm.executor.step_counts()[0]
    with LLM(engines[name], speculative_config=SpeculativeConfig(max_draft_len=5)) as llm:
        got = [o.token_ids for o in llm.generate(prompts, params)]
        stats, steps = llm.executor.spec_stats, llm.executor.step_counts()[0]
        blocks = llm.executor.scheduler.stats()
    assert got == want
    assert stats.num_accepted_tokens > 0 and steps < plain_steps  # the repeating prompt is drafted from
    assert blocks["used_blocks"] == 0  # every block back, rejected drafts' tail blocks included


@pytest.mark.parametrize("mode", ["ngram", "draft_target"])
def test_sampling_keeps_the_targets_distribution(tmp_path, mode):
    """Tokens 2 and 3 of 4,000 seeded requests (temperature 1, top-k 6, repetition penalty 1.3) with and
    without speculation: the same distribution (chi-square homogeneity, p > 1e-3). ngram: the prompt holds
    every token, so the first decode always has a draft, and token 2 is always verified; draft_target: a
    draft of other random weights, which the target often rejects."""
    hf = make_hf_model(tmp_path / "hf", "llama3_gqa", vocab_size=8, initializer_range=0.6, num_hidden_layers=1)
    bc = BuildConfig(max_batch_size=256, max_seq_len=64)
    engine = build_from_hf(hf, tmp_path / "engine", build_config=bc, progress=False)
    config = SpeculativeConfig(max_draft_len=2)
    if mode == "draft_target":
        other = make_hf_model(tmp_path / "draft", "llama3_gqa", seed=7, vocab_size=8, initializer_range=0.6,
                              num_hidden_layers=1, hidden_size=32)
        config = SpeculativeConfig("draft_target", 2, draft_engine_dir=str(
            build_from_hf(other, tmp_path / "draft_engine", build_config=bc, progress=False)))
    prompt = [3, 1, 4, 1, 5, 0, 2, 6, 7, 3]
    n = 4000

    def run(spec: SpeculativeConfig | None, seed0: int) -> tuple[list[list[int]], object]:
        params = [SamplingParams(max_tokens=3, end_id=-1, temperature=1.0, top_k=6, repetition_penalty=1.3,
                                 seed=seed0 + i) for i in range(n)]
        with LLM(engine, speculative_config=spec, enable_prefix_reuse=False) as llm:
            out = [o.token_ids for o in llm.generate([prompt] * n, params)]
            return out, llm.executor.spec_stats

    plain, _ = run(None, 0)
    spec, stats = run(config, 10**6)
    assert stats.num_drafts >= n and 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # some kept, some not
    for position in (1, 2):
        a, b = Counter(t[position] for t in plain), Counter(t[position] for t in spec)
        cells = sorted(set(a) | set(b))
        p = chi2_contingency([[a[c] for c in cells], [b[c] for c in cells]]).pvalue
        assert p > 1e-3, (position, a, b)


def test_stop_conditions_and_prefix_reuse_hold(engines):
    """Stop tokens, stop strings and max_tokens end a speculating request where they end it without
    speculation (a stop inside the accepted draft tokens cuts the rest); a prompt whose blocks were
    cached while speculating gives the same tokens from the cache."""
    engine = engines["stories260K"]
    with LLM(engine) as llm:
        full = llm.generate(REPEATING, SamplingParams(max_tokens=40, end_id=-1))
        stop_at = full.token_ids[20]  # a token the run emits
        cases = [SamplingParams(max_tokens=40, end_id=-1, stop_token_ids=[stop_at]),
                 SamplingParams(max_tokens=40, end_id=-1, stop=[" park"]), SamplingParams(max_tokens=7, end_id=-1)]
        want = [(o.token_ids, o.text, o.finish_reason) for o in llm.generate([REPEATING] * 3, cases)]
        long = llm.generate(" ".join([REPEATING] * 3), SamplingParams(max_tokens=40, end_id=-1)).token_ids
    assert want[0][0][-1] == stop_at and " park" not in want[1][1] and len(want[2][0]) == 7
    with LLM(engine, speculative_config=SpeculativeConfig(max_draft_len=4)) as llm:
        assert [(o.token_ids, o.text, o.finish_reason) for o in llm.generate([REPEATING] * 3, cases)] == want
        for n in range(2):  # the second run takes the prompt's full blocks from the cache the first filled
            again = llm.generate(" ".join([REPEATING] * 3), SamplingParams(max_tokens=40, end_id=-1))
            assert again.token_ids == long and (again.num_cached_tokens > 0) == (n == 1)
        assert llm.executor.spec_stats.num_accepted_tokens > 0
        assert llm.executor.scheduler.stats()["used_blocks"] == 0


def test_server_streams_what_the_offline_engine_gives(engines):
    """`trtc serve --speculative_decoding_mode ngram`: a streamed completion joins to the offline engine's
    greedy text, several tokens may arrive per chunk, and the spec_decode counters count the drafts."""
    from openai import OpenAI
    from serve_helpers import Server

    engine = engines["stories260K"]
    with LLM(engine) as llm:
        want = llm.generate(REPEATING, SamplingParams(max_tokens=48, end_id=-1)).text
    s = Server(engine, "--speculative_decoding_mode", "ngram", "--max_draft_len", "4")
    try:
        client = OpenAI(base_url=s.url + "/v1", api_key="none")
        chunks = [c.choices[0].text for c in client.completions.create(
            model="test-model", prompt=REPEATING, max_tokens=48, temperature=0, stream=True,
            extra_body={"ignore_eos": True}) if c.choices]
        assert "".join(chunks) == want
        assert s.metric("trtc:spec_decode_num_accepted_tokens_total") > 0
        assert s.metric("trtc:spec_decode_num_draft_tokens_total") >= s.metric("trtc:spec_decode_num_accepted_tokens_total")
    finally:
        s.stop()


def test_cli_flags(engines, tmp_path):
    from cli_helpers import assert_one_line_error, cli

    engine = engines["stories260K"]
    outs = []
    for flags in ((), ("--speculative_decoding_mode", "ngram", "--max_draft_len", "3")):
        r = cli("run", "--engine_dir", engine, "--input_text", REPEATING, "--max_output_len", 40, "--end_id", -1, *flags)
        assert r.exit_code == 0, r.output
        outs.append(r.output.split("Output", 1)[1])
    assert outs[0] == outs[1]
    assert_one_line_error(cli("run", "--engine_dir", engine, "--input_text", "a", "--max_draft_len", 3),
                          "--speculative_decoding_mode")
    r = cli("bench", "--engine_dir", engine, "--isl", 16, "--osl", 8, "--num_requests", 2,
            "--speculative_decoding_mode", "ngram", "--quiet")
    assert r.exit_code == 0 and "mean acceptance length" in r.output, r.output


def test_draft_target_greedy_equals_the_engine_without_speculation(engines, tmp_path):
    """A random draft of the same vocabulary (exactness needs no good draft) and the target as its own
    draft (every draft token accepted: k + 1 tokens per step)."""
    target = engines["stories260K"]
    other = make_hf_model(tmp_path / "draft", "llama3_gqa", vocab_size=512, num_hidden_layers=1, hidden_size=32)
    random_draft = build_from_hf(other, tmp_path / "draft_engine", build_config=BuildConfig(max_batch_size=8,
                                 max_seq_len=512), progress=False)
    prompts = [REPEATING, "Once upon a time", "She said: yes, yes, yes, yes"]
    params = SamplingParams(max_tokens=64, end_id=-1)
    with LLM(target) as llm:
        want = [o.token_ids for o in llm.generate(prompts, params)]
    for draft, min_length in ((random_draft, 1.0), (target, 4.5)):
        with LLM(target, speculative_config=SpeculativeConfig("draft_target", 4, draft_engine_dir=str(draft))) as llm:
            assert [o.token_ids for o in llm.generate(prompts, params)] == want
            assert llm.executor.spec_stats.mean_acceptance_length >= min_length
            assert llm.executor.scheduler.stats()["used_blocks"] == 0
            assert llm.executor.draft.ex.scheduler.stats()["used_blocks"] == 0 and not llm.executor.draft.ex.requests
    wrong = build_from_hf(make_hf_model(tmp_path / "v131", "llama3_gqa"), tmp_path / "v131_engine", progress=False)
    with pytest.raises(TrtcError, match="vocabulary"):
        LLM(target, speculative_config=SpeculativeConfig("draft_target", 4, draft_engine_dir=str(wrong)))
    with pytest.raises(TrtcError, match="draft_engine_dir"):
        SpeculativeConfig("draft_target", 4)


def test_draft_engine_dir_without_the_mode_is_one_line(engines):
    from cli_helpers import assert_one_line_error, cli

    assert_one_line_error(cli("run", "--engine_dir", engines["stories260K"], "--input_text", "a", "--draft_engine_dir",
                              engines["stories260K"]), "--speculative_decoding_mode")
    assert_one_line_error(cli("run", "--engine_dir", engines["stories260K"], "--input_text", "a",
                              "--speculative_decoding_mode", "draft_target"), "--draft_engine_dir")
