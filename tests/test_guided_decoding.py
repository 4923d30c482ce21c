"""Guided decoding on CPU: a tiny *random* model constrained by a JSON schema, a regex, a choice list
or an EBNF grammar gives output that parses, for 100 seeded samples over the sampling modes; it can
only do that if the mask is right. Requests without a grammar in the same batch keep every token."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from models import add_byte_tokenizer, make_hf_model

from trtc.compiler.build import build_from_hf
from trtc.errors import TrtcError
from trtc.formats.build_config import BuildConfig
from trtc.llm import LLM
from trtc.runtime.sampling_params import GuidedDecodingParams, SamplingParams

VOCAB = 400  # the tokenizer has 384 tokens: ids 384..399 exist only in the model and must never come out

SCHEMA = {
    "type": "object",
    "properties": {
        # (a string with maxLength: xgrammar 0.2.9 lets raw control characters into it, which strict JSON refuses)
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Oslo", "Lima"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,6}@[a-z]{3,8}\.(com|org)"
CHOICES = ["yes", "no", "the cat sat", "Paris, France"]

# every sampling mode the sampler has, cycled over the samples (each with its own seed)
MODES = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=20),
    dict(temperature=1.3, top_p=0.9),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5),
    dict(),  # greedy
]


CONFIG = BuildConfig(max_batch_size=32, max_num_tokens=256, tokens_per_block=16, max_seq_len=256)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("guided")
    return add_byte_tokenizer(make_hf_model(root / "hf", "llama3_gqa", vocab_size=VOCAB, num_hidden_layers=1))


@pytest.fixture(scope="module")
def llm(hf_dir):
    engine = build_from_hf(hf_dir, hf_dir.parent / "engine", dtype="float32", build_config=CONFIG, progress=False)
    with LLM(engine, device="cpu") as llm:
        yield llm


def samples(llm, guided: GuidedDecodingParams, n: int = 100, max_tokens: int = 160):
    params = [SamplingParams(max_tokens=max_tokens, seed=i, guided_decoding=guided, **MODES[i % len(MODES)])
              for i in range(n)]
    prompts = [f"the cat {i} sat on" for i in range(n)]
    outs = llm.generate(prompts, params)
    for o in outs:
        assert o.finish_reason == "stop", (o.finish_reason, o.text)
        assert all(t < 384 for t in o.token_ids)
    return [o.text for o in outs]


def test_json_schema_outputs_validate(llm):
    texts = samples(llm, GuidedDecodingParams(json=SCHEMA))
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 50, "seeded samples should differ"


def test_json_object_outputs_parse(llm):
    """Any JSON object: free-length keys and strings, so a random model often runs to max_tokens; those
    that end are objects, and the others are prefixes of one (they open with '{')."""
    params = [SamplingParams(max_tokens=40, seed=i, temperature=1.0, guided_decoding=GuidedDecodingParams(json_object=True))
              for i in range(20)]
    outs = llm.generate([f"the cat {i}" for i in range(20)], params)
    done = [o.text for o in outs if o.finish_reason == "stop"]
    assert done and all(isinstance(json.loads(t), dict) for t in done)
    assert all(o.text.startswith("{") and o.finish_reason in ("stop", "length") for o in outs)


def test_regex_outputs_match(llm):
    texts = samples(llm, GuidedDecodingParams(regex=REGEX))
    assert all(re.fullmatch(REGEX, t) for t in texts), [t for t in texts if not re.fullmatch(REGEX, t)]
    assert len(set(texts)) > 50


def test_choice_outputs_are_choices(llm):
    texts = samples(llm, GuidedDecodingParams(choice=CHOICES))
    assert set(texts) <= set(CHOICES) and len(set(texts)) > 1


def test_ebnf_grammar(llm):
    grammar = 'root ::= "(" expr ")"\nexpr ::= num | num [+*] expr\nnum ::= [1-9] [0-9]?'
    pattern = r"\([1-9][0-9]?([+*][1-9][0-9]?)*\)"
    texts = samples(llm, GuidedDecodingParams(grammar=grammar), n=30)
    assert all(re.fullmatch(pattern, t) for t in texts), texts


def test_unconstrained_requests_in_the_batch_are_unchanged(llm):
    """Greedy and seeded sampling requests give the same tokens alone and beside guided ones."""
    plain = [SamplingParams(max_tokens=16, end_id=-1, seed=i, **MODES[i % len(MODES)]) for i in range(8)]
    prompts = [f"the dog {i} ran" for i in range(8)]
    alone = [o.token_ids for o in llm.generate(prompts, plain)]
    guided = [SamplingParams(max_tokens=100, seed=100 + i, temperature=1.0, guided_decoding=GuidedDecodingParams(
        json=SCHEMA if i % 2 else None, regex=None if i % 2 else REGEX)) for i in range(8)]
    mixed = llm.generate([p for pair in zip(prompts, prompts) for p in pair],
                         [p for pair in zip(plain, guided) for p in pair])
    assert [o.token_ids for o in mixed[0::2]] == alone
    assert all(o.finish_reason == "stop" for o in mixed[1::2])


def test_stop_strings_and_several_samples_of_one_request(llm):
    """A stop string inside the constrained text cuts it there; n samples of one prompt (n requests with
    the same params) each follow the grammar on their own matcher."""
    choices = GuidedDecodingParams(choice=["alpha beta", "gamma"])
    out = llm.generate("x", SamplingParams(max_tokens=20, stop=[" beta"], guided_decoding=GuidedDecodingParams(
        regex="alpha beta gamma")))
    assert (out.text, out.finish_reason) == ("alpha", "stop")
    outs = llm.generate(["one prompt"] * 8, SamplingParams(max_tokens=20, temperature=1.0, guided_decoding=choices))
    assert {o.text for o in outs} == {"alpha beta", "gamma"}


def test_without_stop_tokens_the_grammar_ends_the_request(llm):
    """end_id -1 (never stop on a token): the request ends as soon as the grammar is complete."""
    out = llm.generate("q", SamplingParams(max_tokens=50, end_id=-1, guided_decoding=GuidedDecodingParams(
        choice=["Paris, France"])))
    assert (out.text, out.finish_reason) == ("Paris, France", "stop")
    assert llm.tokenizer.eos_token_id not in out.token_ids


def test_grammar_compiled_once(llm):
    guided = llm.executor.guided_decoder
    guided.compile(GuidedDecodingParams(json=SCHEMA))
    size = guided.compiler.get_cache_size_bytes()
    llm.generate(["a", "b"], SamplingParams(max_tokens=40, guided_decoding=GuidedDecodingParams(json=json.dumps(SCHEMA))))
    assert guided.compiler.get_cache_size_bytes() == size
    assert not guided.matchers, "finished requests release their matchers"


@pytest.mark.parametrize("guided, reason", [
    (GuidedDecodingParams(regex="[a-z"), "regex does not compile"),
    (GuidedDecodingParams(json='{"type": "object", "properties": '), "JSON schema does not compile"),
    (GuidedDecodingParams(json={"type": "strng"}), "JSON schema does not compile"),
    (GuidedDecodingParams(grammar="root ::= undefined_rule"), "EBNF grammar does not compile"),
])
def test_bad_constraints_are_refused_with_the_reason(llm, guided, reason):
    with pytest.raises(TrtcError, match=reason):
        llm.executor.add_request([1, 5, 6], SamplingParams(guided_decoding=guided))
    assert not llm.executor.has_unfinished()
    out = llm.generate(["a", "b"], [SamplingParams(guided_decoding=guided), SamplingParams(max_tokens=3)])
    assert out[0].finish_reason == "error" and reason in out[0].error and out[1].finish_reason == "length"


def test_params_take_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one of json, json_object, regex, grammar, choice; got json, regex"):
        GuidedDecodingParams(json={}, regex="a")
    with pytest.raises(ValueError, match="got none"):
        GuidedDecodingParams()
    with pytest.raises(ValueError, match="choice must be a non-empty list of strings"):
        GuidedDecodingParams(choice="yes")
    assert SamplingParams(guided_decoding={"choice": ["a"]}).guided_decoding == GuidedDecodingParams(choice=("a",))


def test_tensor_parallel_rank_0_masks_and_samples(llm, hf_dir):
    """tp 2 (two processes, vocab-parallel LM head gathered on rank 0): the tokens of tp 1."""
    engine = build_from_hf(hf_dir, hf_dir.parent / "tp2", tp_size=2, dtype="float32", build_config=CONFIG, progress=False)
    kinds = [GuidedDecodingParams(json=SCHEMA), GuidedDecodingParams(regex=REGEX), GuidedDecodingParams(choice=CHOICES)]
    params = [SamplingParams(max_tokens=80, seed=i, guided_decoding=kinds[i % 3], **MODES[i % len(MODES)]) for i in range(6)]
    params.append(SamplingParams(max_tokens=8, end_id=-1, temperature=1.0, seed=7))  # and one without a grammar
    prompts = [f"the cat {i} sat on" for i in range(7)]
    with LLM(engine, device="cpu") as tp2:
        got = tp2.generate(prompts, params)
    want = llm.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == ["stop"] * 6 + ["length"]


def test_forced_tool_choices_make_calls_that_validate(llm):
    """tool_choice "required" / a named function, enforced by their grammar: the random model's replies
    parse into calls of the given tools whose arguments validate against the tool's parameters."""
    from trtc.serve.tool_parsers import forced_tool_choice_guided, parse_forced_tool_calls

    city = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1,
            "maximum": 7}}, "required": ["city", "days"], "additionalProperties": False}
    zone = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": city}},
             {"type": "function", "function": {"name": "get_time", "parameters": zone}}]
    schemas = {"get_weather": city, "get_time": zone}
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        guided = forced_tool_choice_guided(tools, choice)
        params = [SamplingParams(max_tokens=240, seed=i, temperature=1.0, guided_decoding=guided) for i in range(20)]
        for out in llm.generate([f"call {i}" for i in range(20)], params):
            calls = parse_forced_tool_calls(choice, out.text)
            assert out.finish_reason == "stop" and calls, out.text
            for call in calls:
                jsonschema.validate(json.loads(call.arguments), schemas[call.name])
            assert choice == "required" or {c.name for c in calls} == {"get_time"}
