"""The runtime on CPU: in-flight batching, chunked prefill, preemption and prefix reuse change no
token; the executor and LLM API keep their promises (queueing, cancel, stop, streaming, cache)."""

from __future__ import annotations

import pytest
import torch
from models import load_hf, make_hf_model

from trtc.compiler.build import build_from_hf
from trtc.formats.build_config import BuildConfig
from trtc.llm import LLM
from trtc.runtime.executor import Executor
from trtc.runtime.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=24, end_id=-1)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    hf = make_hf_model(root / "hf", "llama3_gqa")
    return build_from_hf(hf, root / "engine", build_config=BuildConfig(
        max_batch_size=8, max_num_tokens=24, tokens_per_block=4, max_seq_len=96), progress=False)


@pytest.fixture(scope="module")
def hf_model(engine):
    return load_hf(engine.parent / "hf")


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 131, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def alone(engine, prompt, params=GREEDY) -> list[int]:
    ex = Executor(engine, kv_cache_max_tokens=4096)
    rid = ex.add_request(prompt, params)
    out = []
    ex.requests[rid].on_event = lambda e: out.append(e.token_id)
    ex.run_until_complete()
    return out


def test_in_flight_batching_changes_no_token(engine):
    """18 requests of 2-39 tokens arriving at different steps, a 24-token budget (chunked prefill)
    and a 160-token pool (preemption) give exactly the tokens of each request run alone."""
    ps = prompts(18)
    assert max(len(p) for p in ps) > 24, "some prompt must be longer than the token budget"
    ex = Executor(engine, kv_cache_max_tokens=160)
    outputs: dict[int, list[int]] = {}
    ids: dict[int, int] = {}
    step = 0
    while step < 6 or ex.has_unfinished():
        for i in range(step, len(ps), 6) if step < 6 else ():  # 3 new requests at each of the first 6 steps
            ids[i] = ex.add_request(ps[i], GREEDY)
            outputs[ids[i]] = []
        for event in ex.step():
            outputs[event.request_id].append(event.token_id)
        step += 1
    stats = ex.scheduler.stats()
    assert stats["num_preemptions"] > 0, "the pool was meant to force preemption"
    assert stats["free_blocks"] + stats["cached_blocks"] == stats["num_blocks"]  # every block back
    for i, p in enumerate(ps):
        assert outputs[ids[i]] == alone(engine, p), f"request {i} differs"


def test_prefix_reuse_counts_blocks_and_keeps_tokens(engine):
    shared = prompts(1, seed=5)[0] + prompts(1, seed=6)[0] + prompts(1, seed=7)[0]
    shared = shared[:36]
    first, second = shared + [7, 8, 9], shared + [10, 11]
    ex = Executor(engine, kv_cache_max_tokens=1024)
    ex.add_request(first, GREEDY)
    ex.run_until_complete()
    before = ex.scheduler.stats()["reused_tokens"]
    got = []
    rid = ex.add_request(second, GREEDY)
    ex.requests[rid].on_event = lambda e: got.append(e.token_id)
    ex.run_until_complete()
    reused = ex.scheduler.stats()["reused_tokens"] - before
    assert reused == 36  # the 9 full blocks of 4 tokens of the shared prefix
    no_reuse = Executor(engine, kv_cache_max_tokens=1024, enable_prefix_reuse=False)
    rid = no_reuse.add_request(second, GREEDY)
    expected = []
    no_reuse.requests[rid].on_event = lambda e: expected.append(e.token_id)
    no_reuse.run_until_complete()
    assert no_reuse.scheduler.stats()["reused_tokens"] == 0
    assert got == expected


def test_more_requests_than_max_batch_size_are_queued(engine):
    llm = LLM(engine, kv_cache_max_tokens=2048)
    ps = prompts(20, seed=2)  # max_batch_size is 8
    outs = llm.generate(ps, SamplingParams(max_tokens=5, end_id=-1))
    assert [len(o.token_ids) for o in outs] == [5] * 20
    assert all(o.finish_reason == "length" for o in outs)


def test_end_id_stop_words_and_logprobs(engine, hf_model):
    llm = LLM(engine, kv_cache_max_tokens=2048)
    p = prompts(1, seed=3)[0]
    free = llm.generate(p, SamplingParams(max_tokens=12, end_id=-1, logprobs=True))
    tokens = free.token_ids
    # each logprob is HF's log-softmax of the chosen (greedy: the most likely) token
    with torch.no_grad():
        logits = hf_model(torch.tensor([p + tokens])).logits[0, len(p) - 1 : -1]
    expected = logits.log_softmax(-1).max(-1).values
    assert torch.allclose(torch.tensor(free.outputs[0].logprobs), expected, atol=1e-4)
    with_end = llm.generate(p, SamplingParams(max_tokens=12, end_id=tokens[4]))
    first = tokens.index(tokens[4])
    assert with_end.token_ids == tokens[: first + 1] and with_end.finish_reason == "end_id"
    stop = llm.generate(p, SamplingParams(max_tokens=12, end_id=-1, stop_token_ids=[tokens[6:8]]))
    assert stop.token_ids[-2:] == tokens[6:8] and stop.finish_reason == "stop_words"


def test_top_logprobs_equal_hf(engine, hf_model):
    """top_logprobs: each step's N most likely tokens with HF's log-softmax (1e-4), most likely first,
    for greedy and sampled requests in one batch (sampling does not change the distribution reported)."""
    p = prompts(1, seed=4)[0]
    with LLM(engine, kv_cache_max_tokens=2048) as llm:
        outs = llm.generate([p, p], [SamplingParams(max_tokens=6, end_id=-1, logprobs=True, top_logprobs=5),
                                     SamplingParams(max_tokens=6, end_id=-1, logprobs=True, top_logprobs=2,
                                                    temperature=0.8, seed=1)])
    for out, n in zip(outs, (5, 2)):
        c = out.outputs[0]
        with torch.no_grad():
            logits = hf_model(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1 : -1]
        values, ids = logits.log_softmax(-1).topk(n, dim=-1)  # [6, n]
        assert len(c.top_logprobs) == 6
        for alt, want_ids, want in zip(c.top_logprobs, ids.tolist(), values.tolist(), strict=True):
            assert list(alt) == want_ids and list(alt.values()) == pytest.approx(want, abs=1e-4)
    assert outs[0].outputs[0].logprobs == pytest.approx([next(iter(a.values())) for a in outs[0].outputs[0].top_logprobs])
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(logprobs=True, top_logprobs=21)


def test_cancel_frees_blocks(engine):
    ex = Executor(engine, kv_cache_max_tokens=512)
    a = ex.add_request(prompts(1)[0], SamplingParams(max_tokens=50, end_id=-1))
    b = ex.add_request(prompts(1, seed=9)[0], SamplingParams(max_tokens=5, end_id=-1))
    events = []
    for _ in range(3):
        events += ex.step()
    assert ex.cancel(a)
    while ex.has_unfinished():
        events += ex.step()
    reasons = {e.request_id: e.finish_reason for e in events if e.finish_reason}
    assert reasons == {a: "cancelled", b: "length"}
    s = ex.scheduler.stats()
    assert s["used_blocks"] == 0


def test_streaming_yields_growing_text_and_same_tokens(engine):
    llm = LLM(engine, kv_cache_max_tokens=2048)
    p = prompts(1, seed=4)[0]
    steps = list(llm.generate_stream(p, SamplingParams(max_tokens=10, end_id=-1)))
    assert len(steps) == 10 and steps[-1].finished and not steps[0].finished
    assert steps[-1].token_ids == llm.generate(p, SamplingParams(max_tokens=10, end_id=-1)).token_ids


def test_llm_from_hf_dir_builds_once_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRTC_CACHE_DIR", str(tmp_path / "cache"))
    hf = make_hf_model(tmp_path / "hf", "qwen3_qknorm")
    first = LLM(hf)
    engine_dir = first.engine_dir
    assert engine_dir.is_relative_to(tmp_path / "cache")
    stamp = (engine_dir / "rank0.engine").stat().st_mtime_ns
    second = LLM(hf)
    assert second.engine_dir == engine_dir and (engine_dir / "rank0.engine").stat().st_mtime_ns == stamp
    other = LLM(hf, build_config=BuildConfig(tokens_per_block=8))
    assert other.engine_dir != engine_dir
    ids = [5, 6, 7]
    assert first.generate(ids, GREEDY).token_ids == other.generate(ids, GREEDY).token_ids


def test_prompt_logits_are_teacher_forced_hf_logits(engine, hf_model):
    """Prompt logits through chunked prefill (24-token budget, 40-token prompt) equal HF's."""
    ex = Executor(engine, kv_cache_max_tokens=512)
    p = prompts(1, seed=11)[0] + prompts(1, seed=12)[0]
    p = (p * 3)[:40]
    logits = ex.prompt_logits([p])[0]
    with torch.no_grad():
        expected = hf_model(torch.tensor([p])).logits[0]
    assert logits.shape == expected.shape
    assert float((logits - expected).abs().max() / expected.abs().max()) < 1e-4


def test_largest_step_runs_over_its_scratch_pool(engine, hf_model):
    """The step the GPU runtime measures its activation memory with (max_num_tokens prompt tokens,
    max_batch_size logits rows) is a valid batch: its logits are HF's for that prompt."""
    from trtc.formats.engine import Engine
    from trtc.runtime.model_runner import ModelRunner

    runner = ModelRunner(Engine.load(engine), torch.device("cpu"))
    input_ids, meta, rows = runner.largest_step()
    assert len(input_ids) == 24 and rows.tolist() == list(range(8))
    logits = runner.forward(input_ids, meta, rows)  # [8, vocab]
    with torch.no_grad():
        expected = hf_model(input_ids[None]).logits[0, :8]
    assert float((logits - expected).abs().max() / expected.abs().max()) < 1e-4


def test_prompt_logits_refuse_a_reused_prefix(tmp_path):
    """Teacher-forced logits of a prompt whose prefix blocks were reused would hold never-computed
    rows: one clear error instead (and none without prefix reuse)."""
    from models import make_hf_model

    from trtc.compiler.build import build_from_hf
    from trtc.errors import TrtcError
    from trtc.formats.build_config import BuildConfig
    from trtc.runtime.executor import Executor

    engine = build_from_hf(make_hf_model(tmp_path / "hf", "llama3_gqa"), tmp_path / "e",
                           build_config=BuildConfig(max_seq_len=128, tokens_per_block=8), progress=False)
    prompt = [(7 * i) % 100 + 3 for i in range(40)]
    reusing = Executor(engine, device="cpu")
    first = reusing.prompt_logits([prompt])[0]
    with pytest.raises(TrtcError, match="enable_prefix_reuse=False"):
        reusing.prompt_logits([prompt])
    fresh = Executor(engine, device="cpu", enable_prefix_reuse=False)
    torch.testing.assert_close(fresh.prompt_logits([prompt])[0], first)
    torch.testing.assert_close(fresh.prompt_logits([prompt])[0], first)
