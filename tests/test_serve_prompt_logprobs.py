"""Scoring through `trtc serve` (stories260K on the CPU, one real server process): completions with
echo + logprobs give the prompt's token logprobs (HF's log_softmax, 1e-4) through the official
`openai` client; max_tokens 0 scores the prompt alone; vLLM's prompt_logprobs on completions and
chat; usage.prompt_tokens_details.cached_tokens counts a request's reused prefix blocks."""

from __future__ import annotations

import httpx2 as httpx
import openai
import pytest
import torch
from serve_helpers import CHAT_TEMPLATE, Server, stories260k
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    template = tmp_path_factory.mktemp("chat") / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    s = Server(stories260k(), "--chat_template", str(template))
    yield s
    assert s.stop() == 0, s.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def hf():
    path = stories260k()
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).float().eval()


def hf_log_softmax(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)  # [len, vocab]


def test_echo_logprobs_equal_hf(client, hf):
    """echo + logprobs 2 with max_tokens 1 (lm-eval's request): tokens, token_logprobs, top_logprobs,
    text_offset over prompt + completion; each prompt token's logprob is HF's, the first is null."""
    tok, model = hf
    ids = tok(TEXT).input_ids
    want = hf_log_softmax(model, ids)
    r = client.completions.create(model="test-model", prompt=TEXT, max_tokens=1, echo=True, logprobs=2, temperature=0)
    c = r.choices[0]
    lp = c.logprobs
    assert c.text.startswith(TEXT) and len(c.text) > len(TEXT)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 1
    assert lp.tokens[: len(ids)] == [tok.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for j, t in enumerate(ids[1:]):
        assert abs(lp.token_logprobs[j + 1] - float(want[j, t])) < 1e-4, j
        top = set(want[j].topk(2).indices.tolist()) | {t}
        assert set(lp.top_logprobs[j + 1]) == {tok.decode([i]) for i in top}
    assert abs(lp.token_logprobs[-1] - float(want[-1].max())) < 1e-4  # the generated (greedy) token
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 1


def test_echo_of_token_ids_and_n(client, hf):
    """A prompt of token ids is echoed as its text; n 2 gives both choices the prompt's logprobs."""
    tok, model = hf
    ids = tok(TEXT).input_ids[:12]
    want = hf_log_softmax(model, ids)
    r = client.completions.create(model="test-model", prompt=ids, max_tokens=2, echo=True, logprobs=0, n=2,
                                  temperature=0)
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.text.startswith(tok.decode(ids))
        got = c.logprobs.token_logprobs[1 : len(ids)]
        assert max(abs(g - float(want[j, t])) for j, (g, t) in enumerate(zip(got, ids[1:]))) < 1e-4


def test_max_tokens_zero_scores_the_prompt_alone(client, hf):
    tok, model = hf
    ids = tok(TEXT).input_ids
    want = hf_log_softmax(model, ids)
    r = client.completions.create(model="test-model", prompt=TEXT, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == TEXT and c.finish_reason == "length"
    assert len(c.logprobs.token_logprobs) == len(ids) and r.usage.completion_tokens == 0
    total = sum(c.logprobs.token_logprobs[1:])
    assert abs(total - float(want[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum())) < 1e-3


def test_vllm_prompt_logprobs_on_completions_and_chat(server, hf):
    tok, model = hf
    ids = tok(TEXT).input_ids
    want = hf_log_softmax(model, ids)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": TEXT, "max_tokens": 2, "prompt_logprobs": 3},
                   timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["logprobs"] is None
    plp = choice["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for j, t in enumerate(ids[1:]):
        entry = plp[j + 1]
        assert abs(entry[str(t)]["logprob"] - float(want[j, t])) < 1e-4
        assert entry[str(t)]["rank"] == int((want[j] >= want[j, t]).sum())
        assert entry[str(t)]["decoded_token"] == tok.decode([t])
        assert {int(k) for k, v in entry.items() if v["rank"] <= 3} == set(want[j].topk(3).indices.tolist())
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 2, "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    text = tok.apply_chat_template([{"role": "user", "content": "Once upon a time"}], chat_template=CHAT_TEMPLATE,
                                   tokenize=False, add_generation_prompt=True)
    chat_ids = tok(text).input_ids
    assert body["prompt_logprobs"][0] is None and len(body["prompt_logprobs"]) == len(chat_ids)
    assert all(len(e) == 1 for e in body["prompt_logprobs"][1:])


def test_cached_tokens_count_reused_blocks(client, server):
    """A second request on the same prompt takes its full blocks from the prefix cache: cached_tokens
    says how many prompt tokens; a scoring request (echo + logprobs) computes them all (0)."""
    prompt = "The dog had a red ball." + " Every day he would run and jump and laugh with his friends." * 3
    first = client.completions.create(model="test-model", prompt=prompt, max_tokens=1)
    second = client.completions.create(model="test-model", prompt=prompt, max_tokens=1)
    n = first.usage.prompt_tokens
    tpb = 32  # the engine's tokens per block (the build default)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == (n - 1) // tpb * tpb > 0
    scored = client.completions.create(model="test-model", prompt=prompt, max_tokens=1, echo=True, logprobs=0)
    assert scored.usage.prompt_tokens_details.cached_tokens == 0


@pytest.mark.parametrize("body, words", [
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens 0"),
    ({"prompt": "hi", "max_tokens": 0, "echo": True, "stream": True}, "stream"),
    ({"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt": "hi", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
])
def test_bad_scoring_requests(server, body, words):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_streamed_echo_logprobs_equal_the_response(client):
    """stream with echo + logprobs: the prompt's chunk carries its logprobs (with the first token), as
    the full response does."""
    full = client.completions.create(model="test-model", prompt=TEXT, max_tokens=3, echo=True, logprobs=1)
    chunks = list(client.completions.create(model="test-model", prompt=TEXT, max_tokens=3, echo=True, logprobs=1,
                                            stream=True))
    assert chunks[0].choices[0].text == TEXT
    streamed = [lp for c in chunks for lp in (c.choices[0].logprobs.token_logprobs if c.choices[0].logprobs else [])]
    assert streamed[0] is None and full.choices[0].logprobs.token_logprobs[0] is None
    assert len(streamed) == len(full.choices[0].logprobs.token_logprobs)
    assert max(abs(a - b) for a, b in zip(streamed[1:], full.choices[0].logprobs.token_logprobs[1:])) < 1e-6
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
