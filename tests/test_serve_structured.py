"""Structured output and tool calling through `trtc serve` with the openai client: a tiny random model
with a Hermes-style chat template (tools rendered by it), served with --tool_call_parser hermes and
--reasoning_parser qwen3. A random model only produces parseable output under a working grammar."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from serve_helpers import Server, hermes_engine

SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1,
          "maximum": 9}}, "required": ["city", "days"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": SCHEMA}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    engine = hermes_engine(tmp_path_factory.mktemp("serve_structured"))
    server = Server(engine, "--tool_call_parser", "hermes", "--reasoning_parser", "qwen3")
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    assert server.stop() == 0, server.output()


def chat(client, **kwargs):
    return client.chat.completions.create(model="test-model", messages=kwargs.pop("messages", USER), **kwargs)


def streamed(client, **kwargs) -> tuple[str, str, list, str | None]:
    """(content, reasoning_content, tool calls merged from their fragments, finish_reason) of a stream."""
    content, reasoning, calls, reason = "", "", {}, None
    for chunk in chat(client, stream=True, **kwargs):
        for c in chunk.choices:
            d = c.delta
            content += d.content or ""
            reasoning += getattr(d, "reasoning_content", None) or ""
            for t in d.tool_calls or []:
                entry = calls.setdefault(t.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = entry["id"] or t.id
                entry["name"] += t.function.name or ""
                entry["arguments"] += t.function.arguments or ""
            reason = c.finish_reason or reason
    return content, reasoning, [calls[i] for i in sorted(calls)], reason


def test_response_format_json_schema(client):
    rf = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}}
    for seed in range(5):
        r = chat(client, response_format=rf, temperature=1.0, seed=seed, max_tokens=60)
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
        assert r.choices[0].finish_reason == "stop"
    r = chat(client, response_format={"type": "json_object"}, max_tokens=60, n=2, temperature=1.0, seed=0)
    assert all(c.message.content.startswith("{") for c in r.choices)


def test_vllm_guided_extensions_stream_and_not(client):
    for body, check in [({"guided_choice": ["sunny", "rainy day"]}, lambda t: t in ("sunny", "rainy day")),
                        ({"guided_regex": "[0-9]{2}-[a-z]{3}"}, lambda t: len(t) == 6 and t[2] == "-")]:
        r = chat(client, extra_body=body, temperature=1.0, seed=3, max_tokens=30)
        text = r.choices[0].message.content
        assert check(text), text
        content, _, _, reason = streamed(client, extra_body=body, temperature=1.0, seed=3, max_tokens=30)
        assert (content, reason) == (text, "stop")


@pytest.mark.parametrize("body, reason", [
    ({"extra_body": {"guided_regex": "[a-z"}}, "regex does not compile"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}},
     "JSON schema does not compile"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_stock"}}},
     "tool_choice names function 'get_stock', which is not in tools"),
    ({"extra_body": {"guided_regex": "a", "guided_choice": ["b"]}}, "give at most one of"),
])
def test_bad_constraints_are_400_with_the_reason(client, body, reason):
    with pytest.raises(openai.BadRequestError, match=reason):
        chat(client, max_tokens=5, **body)


def test_named_and_required_tool_choice(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = chat(client, tools=[WEATHER, TIME], tool_choice=named, temperature=1.0, seed=1, max_tokens=60)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA)
    content, _, calls, reason = streamed(client, tools=[WEATHER, TIME], tool_choice=named, temperature=1.0, seed=1,
                                         max_tokens=60)
    assert reason == "tool_calls" and [(x["name"], x["arguments"]) for x in calls] == [("get_weather", call.function.arguments)]
    r = chat(client, tools=[WEATHER, TIME], tool_choice="required", temperature=1.0, seed=2, max_tokens=200)
    assert r.choices[0].finish_reason == "tool_calls"
    assert {t.function.name for t in r.choices[0].message.tool_calls} <= {"get_weather", "get_time"}


def test_auto_tool_calls_and_reasoning_are_parsed(client):
    """The model is made to write a Qwen3-style reply (a guided regex of that exact text): the server
    splits the reasoning out and parses the <tool_call> block, streamed and not."""
    call = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}'
    reply = f"<think>need data</think>\n\nChecking.\n<tool_call>\n{call}\n</tool_call>"
    regex = reply.replace("{", "\\{").replace("}", "\\}").replace(".", "\\.")
    kwargs = dict(tools=[WEATHER], extra_body={"guided_regex": regex}, max_tokens=120)
    m = chat(client, **kwargs).choices[0]
    assert m.finish_reason == "tool_calls" and m.message.content == "Checking.\n"
    assert m.message.reasoning_content == "need data"
    assert [(t.function.name, json.loads(t.function.arguments)) for t in m.message.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 2})]
    content, reasoning, calls, reason = streamed(client, **kwargs)
    assert (content, reasoning, reason) == ("Checking.\n", "need data", "tool_calls")
    assert [(x["name"], json.loads(x["arguments"])) for x in calls] == [("get_weather", {"city": "Paris", "days": 2})]


def test_tool_choice_none_and_tool_results_in_the_conversation(client):
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                               "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    r = chat(client, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=5)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
