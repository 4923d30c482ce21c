"""`trtc serve` against the offline engine, through the official `openai` client: one real server
process (stories260K on the CPU) for the module."""

from __future__ import annotations

import asyncio
import time

import httpx2 as httpx
import openai
import pytest
from serve_helpers import CHAT_TEMPLATE, Server, stories260k

from trtc import SamplingParams
from trtc.llm import LLM

PROMPTS = ["Once upon a time", "The dog", "Lily saw a big", "One day, Tom"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    template = tmp_path_factory.mktemp("chat") / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    s = Server(stories260k(), "--chat_template", str(template))
    yield s
    assert s.stop() == 0, s.output()


@pytest.fixture(scope="module")
def offline():
    with LLM(stories260k(), device="cpu") as llm:
        yield llm


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=60, max_retries=0)


def greedy(offline, prompt, n=24):
    return offline.generate(prompt, SamplingParams(max_tokens=n))


def test_completion_equals_offline_and_usage(client, offline):
    for prompt in PROMPTS:
        want = greedy(offline, prompt)
        r = client.completions.create(model="test-model", prompt=prompt, max_tokens=24, temperature=0)
        assert r.choices[0].text == want.text
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 24  # "length" means exactly max_tokens tokens
        assert r.usage.prompt_tokens == len(want.prompt_token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + 24


def test_prompt_list_token_ids_and_echo(client, offline):
    want = [greedy(offline, p, 8) for p in PROMPTS[:2]]
    r = client.completions.create(model="test-model", prompt=PROMPTS[:2], max_tokens=8)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [w.text for w in want]
    r = client.completions.create(model="test-model", prompt=want[0].prompt_token_ids, max_tokens=8, echo=False)
    assert r.choices[0].text == want[0].text
    r = client.completions.create(model="test-model", prompt=PROMPTS[0], max_tokens=8, echo=True)
    assert r.choices[0].text == PROMPTS[0] + want[0].text


def test_stream_joins_to_the_non_streamed_text(client, offline):
    for prompt in PROMPTS[:2]:
        want = greedy(offline, prompt)
        chunks = list(client.completions.create(model="test-model", prompt=prompt, max_tokens=24, stream=True,
                                                stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert text == want.text
        assert reasons == ["length"]
        assert chunks[-1].usage.completion_tokens == 24


def test_chat_equals_offline_on_the_rendered_template(client, offline):
    messages = [{"role": "user", "content": "Once upon a time"}]
    prompt = offline.tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False,
                                                   add_generation_prompt=True)
    want = greedy(offline, prompt, 16)
    r = client.chat.completions.create(model="test-model", messages=messages, max_completion_tokens=16)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="test-model", messages=messages, max_tokens=16, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]


def test_logprobs_shapes_match_offline(client, offline):
    want = offline.generate(PROMPTS[0], SamplingParams(max_tokens=6, logprobs=True))
    r = client.completions.create(model="test-model", prompt=PROMPTS[0], max_tokens=6, logprobs=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 6
    assert lp.token_logprobs == pytest.approx(want.outputs[0].logprobs, abs=1e-5)
    r = client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       logprobs=True)
    assert len(r.choices[0].logprobs.content) == 5 and all(t.logprob <= 0 for t in r.choices[0].logprobs.content)


def test_top_logprobs_equal_offline(client, offline):
    """completions `logprobs: N` and chat `top_logprobs: N` carry the N most likely tokens of each
    step, most likely first, equal to `LLM.generate`'s; streamed chunks carry the same."""
    want = offline.generate(PROMPTS[1], SamplingParams(max_tokens=5, logprobs=True, top_logprobs=3)).outputs[0]
    assert len(want.top_logprobs) == 5 and all(len(t) == 3 for t in want.top_logprobs)
    text = {i: offline.tokenizer.decode([i]) for alt in want.top_logprobs for i in alt}
    r = client.completions.create(model="test-model", prompt=PROMPTS[1], max_tokens=5, logprobs=3)
    tops = r.choices[0].logprobs.top_logprobs
    for got, alt in zip(tops, want.top_logprobs, strict=True):
        assert got == pytest.approx({text[i]: v for i, v in alt.items()}, abs=1e-5)
    stream = client.completions.create(model="test-model", prompt=PROMPTS[1], max_tokens=5, logprobs=3, stream=True)
    assert [t for c in stream for t in c.choices[0].logprobs.top_logprobs] == tops
    r = client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       logprobs=True, top_logprobs=2)
    for t in r.choices[0].logprobs.content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)  # greedy: the top token


def test_seeded_n2_sampling_is_reproducible(client):
    def sample():
        r = client.completions.create(model="test-model", prompt=PROMPTS[0], max_tokens=16, n=2, seed=7,
                                      temperature=1.0, top_p=0.95)
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first = sample()
    assert len(first) == 2 and sample() == first


def test_stop_string_ends_with_stop(client, offline):
    want = greedy(offline, PROMPTS[0], 30).text
    assert "Lily" in want
    r = client.completions.create(model="test-model", prompt=PROMPTS[0], max_tokens=30, stop=["Lily"])
    assert r.choices[0].text == want[: want.index("Lily")] and r.choices[0].finish_reason == "stop"


def test_200_concurrent_streams_get_their_offline_outputs(server, offline):
    prompts = [f"{PROMPTS[i % 4]}" for i in range(200)]
    lengths = [8 + i % 9 for i in range(200)]
    want = offline.generate(prompts, [SamplingParams(max_tokens=n) for n in lengths])

    async def one(client, prompt, n):
        stream = await client.completions.create(model="test-model", prompt=prompt, max_tokens=n, stream=True)
        text, reasons = [], []
        async for c in stream:
            text.append(c.choices[0].text)
            reasons += [c.choices[0].finish_reason] if c.choices[0].finish_reason else []
        return "".join(text), reasons

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", timeout=60, max_retries=0,
                                      http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=250))) as c:
            return await asyncio.wait_for(asyncio.gather(*[one(c, p, n) for p, n in zip(prompts, lengths)]), 120)

    got = asyncio.run(main())
    assert [g[0] for g in got] == [w.text for w in want]
    assert all(g[1] == ["length"] for g in got)


def test_200_abandoned_requests_free_their_kv_blocks(server, client):
    async def abandon():
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=250), timeout=30) as http:
            async def one(i):
                body = {"prompt": PROMPTS[i % 4], "max_tokens": 400, "stream": i % 2 == 0}
                try:
                    await asyncio.wait_for(http.post(server.url + "/v1/completions", json=body), 0.5)
                except asyncio.TimeoutError:
                    pass
            await asyncio.gather(*[one(i) for i in range(200)])

    asyncio.run(abandon())
    start = time.monotonic()
    r = client.completions.create(model="test-model", prompt=PROMPTS[1], max_tokens=4)
    assert r.usage.completion_tokens == 4 and time.monotonic() - start < 5
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        running, usage = server.metric("trtc:num_requests_running"), server.metric("trtc:kv_cache_usage_perc")
        if running == 0 and usage == 0:
            break
        time.sleep(0.2)
    assert (running, usage) == (0, 0)
    assert server.metric("trtc:num_requests_waiting") == 0


def test_metrics_count_requests_and_tokens(server, client):
    before = server.metrics()
    for prompt in PROMPTS:
        client.completions.create(model="test-model", prompt=prompt, max_tokens=5)
    after = server.metrics()

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    lab = '{model_name="test-model"}'
    assert delta('trtc:request_success_total{finished_reason="length",model_name="test-model"}') == 4
    assert delta(f"trtc:generation_tokens_total{lab}") == 20
    assert delta(f"trtc:time_to_first_token_seconds_count{lab}") == 4
    assert delta(f"trtc:e2e_request_latency_seconds_count{lab}") == 4
    assert delta(f"trtc:request_queue_time_seconds_count{lab}") == 4
    assert delta(f"trtc:inter_token_latency_seconds_count{lab}") == 16  # 4 gaps per 5-token request
    assert delta(f"trtc:prompt_tokens_total{lab}") == delta(f"trtc:prefix_cache_queries_total{lab}") > 0
    assert f"trtc:kv_cache_usage_perc{lab}" in after and f"trtc:num_preemptions_total{lab}" in after
