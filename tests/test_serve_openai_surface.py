"""The OpenAI surface that clients use, through a real `trtc serve` process and the official openai
client: a tiny random Llama with a byte-level tokenizer and a Hermes-style chat template (tools
rendered by it), served with --tool_call_parser hermes.

- logit_bias: +100 forces a token and -100 bans one under greedy decoding, on completions and chat,
  streamed and not, with the offline engine's tokens for the same bias; the logprobs stay the model's
  (a random model over 400 tokens gives the forced token a logprob near log(1/400), not 0).
- tool_choice "required" returns parsed tool_calls; parallel_tool_calls false gives exactly one; with a
  response_format beside it (as agent frameworks send) the reply is still the call.
- An OpenAI field that would change the output and is not implemented is a 400 naming it; a field of
  no schema is ignored; models.retrieve; echo of a token-id prompt; /tokenize and /detokenize equal
  the tokenizer (the chat template applied for messages); the Responses API gives chat's text for the
  same messages (whole and streamed, with its event sequence), function_call items, a json_schema
  format that validates; a stream the client leaves is counted as an abort.
"""

from __future__ import annotations

import json
import threading
import time

import httpx2 as httpx
import jsonschema
import openai
import pytest
from serve_helpers import Server, hermes_engine

from trtc import SamplingParams
from trtc.llm import LLM, load_tokenizer

SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1,
          "maximum": 9}}, "required": ["city", "days"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": SCHEMA}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
PROMPT = "The weather in Paris is"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    engine = hermes_engine(tmp_path_factory.mktemp("serve_surface"))
    server = Server(engine, "--tool_call_parser", "hermes")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    yield server, client, engine
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def offline(served):
    with LLM(served[2], device="cpu") as llm:
        yield llm


def offline_tokens(llm: LLM, prompt: str, bias: dict[int, float] | None, n: int = 8) -> list[str]:
    """The offline engine's greedy tokens, each as the server's logprobs name it (its decoded text)."""
    ids = llm.generate(prompt, SamplingParams(max_tokens=n, end_id=-1, temperature=0.0, logit_bias=bias)).token_ids
    return [llm.tokenizer.decode([t]) for t in ids]


def completion_tokens(client, bias: dict | None, stream: bool = False, n: int = 8) -> tuple[list[str], list[float]]:
    """The greedy tokens (logprobs' token strings) and their logprobs."""
    kwargs = dict(model="test-model", prompt=PROMPT, max_tokens=n, temperature=0, logprobs=0,
                  extra_body={"ignore_eos": True})
    if bias is not None:
        kwargs["logit_bias"] = {str(k): v for k, v in bias.items()}
    if not stream:
        c = client.completions.create(**kwargs).choices[0]
        return c.logprobs.tokens, c.logprobs.token_logprobs
    tokens, lps = [], []
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                lps += c.logprobs.token_logprobs
    return tokens, lps


def test_logit_bias_forces_and_bans_as_the_offline_engine(served, offline):
    _, client, _ = served
    base, _ = completion_tokens(client, None)
    assert base == offline_tokens(offline, PROMPT, None)
    first = offline.generate(PROMPT, SamplingParams(max_tokens=1, end_id=-1, temperature=0.0)).token_ids[0]
    forced = next(t for t in range(300, 400) if offline.tokenizer.decode([t]) not in base)
    for stream in (False, True):
        tokens, lps = completion_tokens(client, {forced: 100}, stream)
        assert tokens == [offline.tokenizer.decode([forced])] * 8 == offline_tokens(offline, PROMPT, {forced: 100})
        assert all(lp < -1.0 for lp in lps), lps  # the model's distribution, not the biased one
        banned, _ = completion_tokens(client, {first: -100}, stream)
        assert banned[0] != base[0] and banned == offline_tokens(offline, PROMPT, {first: -100})


def test_logit_bias_on_chat_and_bad_bias_is_400(served):
    server, client, engine = served
    tokenizer = load_tokenizer(engine)
    forced = tokenizer.encode("Z", add_special_tokens=False)[0]
    r = client.chat.completions.create(model="test-model", messages=USER, max_tokens=5, temperature=0,
                                       logit_bias={str(forced): 100})
    assert r.choices[0].message.content == "ZZZZZ"
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="test-model", messages=USER, max_tokens=5, temperature=0, logit_bias={str(forced): 100}, stream=True)
        if c.choices)
    assert text == "ZZZZZ"
    for bias, words in (({"5": 101}, "logit_bias"), ({"x": 1}, "logit_bias"), ({"4000": 1}, "4000")):
        resp = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2, "logit_bias": bias},
                          timeout=30)
        assert resp.status_code == 400 and words in resp.json()["error"]["message"], resp.text


def test_required_tool_choice_and_one_call_without_parallel(served):
    _, client, _ = served
    r = client.chat.completions.create(model="test-model", messages=USER, tools=[WEATHER, TIME], tool_choice="required",
                                       parallel_tool_calls=False, temperature=1.0, seed=3, max_tokens=160)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, c
    call = c.message.tool_calls[0].function
    assert call.name in ("get_weather", "get_time")
    jsonschema.validate(json.loads(call.arguments), (WEATHER if call.name == "get_weather" else TIME)["function"]
                        ["parameters"])


def test_a_forced_tool_choice_with_a_response_format_is_the_call(served):
    """Agent frameworks send their output schema on every turn, a forced tool_choice too: the reply is
    the call (chat and the Responses API)."""
    _, client, _ = served
    fmt = {"type": "json_schema", "json_schema": {"name": "final", "schema": {"type": "object", "properties": {
        "answer": {"type": "string"}}, "required": ["answer"]}}}
    r = client.chat.completions.create(model="test-model", messages=USER, tools=[WEATHER], tool_choice="required",
                                       response_format=fmt, temperature=1.0, seed=3, max_tokens=160)
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
    jsonschema.validate(json.loads(r.choices[0].message.tool_calls[0].function.arguments), SCHEMA)
    resp = client.responses.create(model="test-model", input=USER, tools=[{"type": "function", **WEATHER["function"]}],
                                   tool_choice="required", max_output_tokens=160, extra_body={"seed": 5},
                                   text={"format": {"type": "json_schema", "name": "final",
                                                    "schema": fmt["json_schema"]["schema"]}})
    assert [o.type for o in resp.output] == ["function_call"] and resp.output[0].name == "get_weather"


def test_fields_that_change_the_output_are_refused_others_ignored(served):
    server, client, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="test-model", messages=USER, max_tokens=2,
                                       extra_body={"prediction": {"type": "content", "content": "x"}})
    assert e.value.body["param"] == "prediction" and "prediction" in e.value.body["message"]
    resp = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2, "suffix": "end"}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "suffix", resp.text
    ok = client.chat.completions.create(model="test-model", messages=USER, max_tokens=2, user="u1",
                                        metadata={"k": "v"}, store=False, extra_body={"some_vendor_field": 1})
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_models_retrieve_and_echo_of_token_ids(served):
    server, client, engine = served
    model = client.models.retrieve("test-model")
    assert model.id == "test-model"
    assert httpx.get(server.url + "/v1/models/other", timeout=10).status_code == 404
    tokenizer = load_tokenizer(engine)
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    c = client.completions.create(model="test-model", prompt=ids, max_tokens=3, temperature=0, echo=True).choices[0]
    assert c.text.startswith(tokenizer.decode(ids)) and len(c.text) > len(tokenizer.decode(ids))


def test_tokenize_and_detokenize_equal_the_tokenizer(served):
    server, _, engine = served
    tokenizer = load_tokenizer(engine)
    r = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}, timeout=10).json()
    assert r["tokens"] == tokenizer(PROMPT).input_ids and r["count"] == len(r["tokens"]) and r["max_model_len"] == 1024
    r = httpx.post(server.url + "/tokenize", json={"messages": USER}, timeout=10).json()
    text = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert r["tokens"] == tokenizer(text, add_special_tokens=False).input_ids
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}, timeout=10).json()["prompt"] == PROMPT
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [5000]}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    info = httpx.get(server.url + "/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == "</s>" and "chat_template" in info


def test_responses_give_the_chat_text_whole_and_streamed(served):
    _, client, _ = served
    chat = client.chat.completions.create(model="test-model", messages=USER, max_tokens=12, temperature=0)
    resp = client.responses.create(model="test-model", input=USER[0]["content"], max_output_tokens=12, temperature=0)
    assert resp.output_text == chat.choices[0].message.content
    assert resp.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert resp.output[-1].type == "message" and resp.output[-1].status == resp.status  # cut: its item too
    with pytest.raises(openai.BadRequestError) as e:  # the error names the field that was sent
        client.responses.create(model="test-model", input="hi", max_output_tokens=5000)
    assert "max_output_tokens (5000)" in e.value.body["message"] and "max_completion" not in e.value.body["message"]
    assert resp.usage.output_tokens == chat.usage.completion_tokens
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    kinds, text = [], ""
    with client.responses.stream(model="test-model", input=USER, max_output_tokens=12, temperature=0) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
            final = getattr(event, "response", None)  # the last event's: response.completed or .incomplete
    assert text == final.output_text == chat.choices[0].message.content
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in ("response.completed",
                                                                                        "response.incomplete")
    assert "response.output_text.done" in kinds


def test_responses_function_tools_and_json_schema(served):
    _, client, _ = served
    resp = client.responses.create(model="test-model", input=USER, tools=[{"type": "function", **WEATHER["function"]}],
                                   tool_choice="required", parallel_tool_calls=False, temperature=1.0,
                                   max_output_tokens=160, extra_body={"seed": 5})
    calls = [o for o in resp.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), SCHEMA)
    follow = client.responses.create(model="test-model", max_output_tokens=4, input=[
        *USER, {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temp": 21}'}])
    assert follow.output[0].type == "message"
    out = client.responses.create(model="test-model", input=USER, max_output_tokens=120, temperature=1.0,
                                  text={"format": {"type": "json_schema", "name": "w", "schema": SCHEMA}})
    jsonschema.validate(json.loads(out.output_text), SCHEMA)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="test-model", input="hi", previous_response_id="resp_1")
    assert e.value.body["param"] == "previous_response_id"


def test_a_stream_the_client_leaves_counts_as_abort(served):
    server, _, _ = served
    before = server.metric("trtc:request_success_total", finished_reason="abort")
    got = threading.Event()

    def read():
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
                "prompt": PROMPT, "max_tokens": 900, "stream": True, "ignore_eos": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    got.set()
                    return  # leaves mid-stream: the connection closes

    t = threading.Thread(target=read)
    t.start()
    assert got.wait(60)
    t.join(30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and server.metric("trtc:request_success_total", finished_reason="abort") == before:
        time.sleep(0.2)
    assert server.metric("trtc:request_success_total", finished_reason="abort") == before + 1
    assert server.metric("trtc:num_requests_running") == 0
