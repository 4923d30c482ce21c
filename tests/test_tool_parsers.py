"""Tool-call and reasoning parsers on fixed model outputs: whole and streamed in every chunking (the
deltas add up to the whole reply's parse), malformed calls returned as text; the grammars of forced
tool choices compile and their replies parse."""

from __future__ import annotations

import json
import random

import pytest
import xgrammar as xgr

from trtc.serve.reasoning_parsers import parse_reasoning, reasoning_stream
from trtc.serve.tool_parsers import (
    forced_tool_choice_guided,
    parse_forced_tool_calls,
    parse_tool_calls,
    tool_call_stream,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                              "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                             "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}

CALL_PARIS = ("get_weather", {"city": "Paris"})
CALL_TIME = ("get_time", {"zone": "CET"})

# (parser, model output, expected content, expected calls as (name, arguments))
CASES = [
    ("hermes", "The weather is mild.", "The weather is mild.", []),
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check.\n", [CALL_PARIS]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>', None, [CALL_PARIS, CALL_TIME]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>',  # bad JSON: text
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>', []),
    ("hermes", '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',  # no name: text
     '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>', []),
    ("hermes", '<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}',  # args as JSON text, unclosed
     None, [CALL_TIME]),
    ("hermes", 'a < b, and <tool_ is not a tag', "a < b, and <tool_ is not a tag", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [CALL_PARIS]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                    '{"name": "get_time", "arguments": {"zone": "CET"}}', None, [CALL_PARIS, CALL_TIME]),
    ("llama3_json", "It is sunny in Paris {today}.", "It is sunny in Paris {today}.", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": ', '{"name": "get_weather", "parameters": {"city": ', []),
    ("llama3_json", '{"city": "Paris"}', '{"city": "Paris"}', []),  # JSON that is not a call
    ("llama3_json", "  ", "  ", []),
]


def _calls(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_tool_calls_whole_reply(parser, text, content, calls):
    reply = parse_tool_calls(parser, text)
    assert (reply.content, _calls(reply.tool_calls)) == (content, calls)
    assert len({c.id for c in reply.tool_calls}) == len(calls) and all(c.id.startswith("call_") for c in reply.tool_calls)


@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_tool_calls_streamed_add_up_to_the_whole_reply(parser, text, content, calls):
    rng = random.Random(0)
    chunkings = [[1] * len(text)] + [[rng.randint(1, 7) for _ in text] for _ in range(5)]
    for sizes in chunkings:
        stream, deltas, i = tool_call_stream(parser), [], 0
        for n in sizes:
            if i >= len(text):
                break
            deltas.append(stream.feed(text[i : i + n]))
            i += n
        deltas.append(stream.finish())
        got_content = "".join(d.content for d in deltas)
        entries = [t for d in deltas for t in d.tool_calls]
        assert [e.index for e in entries] == list(range(len(calls)))
        assert [(e.name, json.loads(e.arguments)) for e in entries] == calls
        assert got_content == (content or "") or (content is None and not got_content.strip())


def test_content_is_streamed_before_the_call_completes():
    stream = tool_call_stream("hermes")
    assert stream.feed("Checking the weather").content == "Checking the weather"
    assert stream.feed(" now <tool").content == " now "  # '<tool' may open a call: held back
    d = stream.feed('_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert d.content == "" and not d.tool_calls  # the call is not complete yet
    d = stream.feed("\n</tool_call>")
    assert [(t.name, json.loads(t.arguments)) for t in d.tool_calls] == [CALL_PARIS]


def test_unknown_parser_names_the_choices():
    with pytest.raises(ValueError, match="unknown tool call parser 'mistral'; choose one of hermes, llama3_json"):
        tool_call_stream("mistral")
    with pytest.raises(ValueError, match="choose one of deepseek_r1, qwen3"):
        reasoning_stream("r2")


# Forced tool choices ---------------------------------------------------------------------------------
def test_named_tool_choice_constrains_to_its_parameters():
    choice = {"type": "function", "function": {"name": "get_time"}}
    guided = forced_tool_choice_guided([WEATHER, TIME], choice)
    assert guided.json == TIME["function"]["parameters"]
    assert _calls(parse_forced_tool_calls(choice, '{"zone": "UTC"}')) == [("get_time", {"zone": "UTC"})]
    assert parse_forced_tool_calls(choice, '{"zone": "U') == []  # cut short by max_tokens


def test_required_tool_choice_is_an_array_of_calls():
    guided = forced_tool_choice_guided([WEATHER, TIME], "required")
    xgr.Grammar.from_json_schema(json.dumps(guided.json))  # xgrammar takes it
    text = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {"zone": "CET"}}]'
    assert _calls(parse_forced_tool_calls("required", text)) == [CALL_PARIS, CALL_TIME]
    assert forced_tool_choice_guided([WEATHER], "auto") is None and forced_tool_choice_guided([WEATHER], "none") is None


@pytest.mark.parametrize("tools, choice, error", [
    ([WEATHER], {"type": "function", "function": {"name": "get_stock"}},
     "tool_choice names function 'get_stock', which is not in tools \\(get_weather\\)"),
    ([], "required", "tool_choice 'required' needs at least one tool"),
    ([WEATHER], "always", "tool_choice must be 'auto', 'none', 'required' or a named function"),
    ([{"type": "function", "function": {"description": "no name"}}], "auto", "each tool needs a function with a name"),
])
def test_bad_tool_choice_names_the_problem(tools, choice, error):
    with pytest.raises(ValueError, match=error):
        forced_tool_choice_guided(tools, choice)


# Reasoning ---------------------------------------------------------------------------------------------
REASONING_CASES = [
    ("qwen3", "<think>\nThe user greets me.\n</think>\n\nHello!", "\nThe user greets me.\n", "Hello!"),
    ("qwen3", "Hello!", None, "Hello!"),
    ("qwen3", "<think>still thinking", "still thinking", None),
    ("qwen3", "<thinking is a word", None, "<thinking is a word"),
    ("deepseek_r1", "The user greets me.</think>Hello!", "The user greets me.", "Hello!"),
    ("deepseek_r1", "<think>The user greets me.</think>\nHello!", "The user greets me.", "Hello!"),
    ("deepseek_r1", "cut short by max_tokens", "cut short by max_tokens", None),
]


@pytest.mark.parametrize("parser, text, reasoning, content", REASONING_CASES)
def test_reasoning_whole_and_streamed(parser, text, reasoning, content):
    assert parse_reasoning(parser, text) == (reasoning, content)
    for size in (1, 2, 3, 5):
        stream = reasoning_stream(parser)
        deltas = [stream.feed(text[i : i + size]) for i in range(0, len(text), size)] + [stream.finish()]
        assert "".join(d.reasoning_content for d in deltas) == (reasoning or "")
        assert "".join(d.content for d in deltas) == (content or "")


# Chat templates with tools (the tiny test models') -------------------------------------------------------
@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_chat_template_renders_tools_and_its_calls_parse_back(parser, tmp_path):
    """A conversation with a tool call and its result goes through the template; the assistant turn is
    written in the format the parser reads (the model learns to write what it was shown)."""
    from models import add_byte_tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(add_byte_tokenizer(tmp_path, chat_template=parser))
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    prompt = tok.apply_chat_template(messages, tools=[WEATHER, TIME], tokenize=False, add_generation_prompt=True)
    assert json.dumps(WEATHER["function"]["parameters"]) in prompt and '{"temp": 21}' in prompt
    turn_start = "<|im_start|>assistant\n" if parser == "hermes" else "<|start_header_id|>assistant<|end_header_id|>\n\n"
    turn = prompt.split(turn_start)[1].split("<|im_end|>" if parser == "hermes" else "<|eot_id|>")[0]
    reply = parse_tool_calls(parser, turn)
    assert _calls(reply.tool_calls) == [CALL_PARIS] and reply.content is None
    ids = tok(prompt, add_special_tokens=False).input_ids
    assert tok.decode(ids) == prompt  # every marker is one token and decodes back
