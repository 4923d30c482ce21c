"""SamplingParams: defaults, greedy detection, normalisation and one-line validation errors."""

import math

import pytest

from trtc.runtime.sampling_params import SamplingParams

STOP_IDS = "stop_token_ids entries must be non-empty sequences of token ids >= 0,"


def test_defaults_are_greedy_trtllm_style():
    p = SamplingParams()
    assert p.max_tokens == 32 and p.is_greedy
    assert p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
    assert p.stop_token_ids == [] and p.stop == [] and p.end_id is None and not p.logprobs


@pytest.mark.parametrize(
    "kwargs, greedy",
    [
        ({}, True),
        ({"temperature": 0}, True),
        ({"temperature": 0.0, "top_p": 0.9}, True),
        ({"top_k": 1}, True),
        ({"top_k": 1, "temperature": 1.5}, True),
        ({"seed": 3, "repetition_penalty": 1.2}, True),  # penalties alone do not make it sample
        ({"temperature": 0.7}, False),
        ({"temperature": 1.0}, False),
        ({"top_k": 50}, False),
        ({"top_k": 0}, False),  # set (to "off") → samples the full distribution at temperature 1
        ({"top_p": 0.9}, False),
        ({"top_p": 1.0}, False),
        ({"min_p": 0.1}, False),
    ],
)
def test_is_greedy(kwargs, greedy):
    assert SamplingParams(**kwargs).is_greedy is greedy


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_p": 0}, "top_p must be in (0, 1], got 0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_p": math.nan}, "top_p must be in (0, 1], got nan"),
        ({"temperature": -0.1}, "temperature must be >= 0, got -0.1"),
        ({"temperature": "hot"}, "temperature must be >= 0, got 'hot'"),
        ({"top_k": -1}, "top_k must be an integer >= 0, got -1"),
        ({"top_k": 2.5}, "top_k must be an integer >= 0, got 2.5"),
        ({"min_p": -0.01}, "min_p must be in [0, 1], got -0.01"),
        ({"min_p": 1.01}, "min_p must be in [0, 1], got 1.01"),
        ({"repetition_penalty": 0}, "repetition_penalty must be > 0, got 0"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1, got 0"),
        ({"max_tokens": True}, "max_tokens must be an integer >= 1, got True"),
        ({"end_id": -2}, "end_id must be an integer >= -1, got -2"),
        ({"seed": 1.5}, "seed must be an integer or None, got 1.5"),
        ({"stop_token_ids": [1, -5]}, f"{STOP_IDS} got -5"),
        ({"stop_token_ids": [[1, 2], []]}, f"{STOP_IDS} got []"),
        ({"stop_token_ids": [[1, "a"]]}, f"{STOP_IDS} got [1, 'a']"),
        ({"stop_token_ids": [[1, True]]}, f"{STOP_IDS} got [1, True]"),
        ({"stop": ["ok", ""]}, "stop must be a list of non-empty strings, got ['ok', '']"),
    ],
)
def test_validation_messages(kwargs, message):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_p": 1.0, "min_p": 0.0, "top_k": 0, "temperature": 0.0},
        {"min_p": 1.0, "presence_penalty": -2.0, "frequency_penalty": 2.0, "repetition_penalty": 1e-3},
        {"temperature": 100.0, "top_p": 1e-9, "max_tokens": 1, "end_id": 0, "seed": 0},
    ],
)
def test_range_edges_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_stop_token_ids_normalised_to_sequences():
    assert SamplingParams(stop_token_ids=[1, 2]).stop_token_ids == [[1], [2]]
    assert SamplingParams(stop_token_ids=[[1, 2], 3, (4, 5)]).stop_token_ids == [[1, 2], [3], [4, 5]]
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []


def test_stop_string_becomes_list():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_instances_do_not_share_lists():
    a, b = SamplingParams(), SamplingParams()
    a.stop_token_ids.append([1])
    assert b.stop_token_ids == []
