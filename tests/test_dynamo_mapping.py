"""The Dynamo worker's pure mappings (no Dynamo needed): a Dynamo request's options to SamplingParams,
with a one-line error for what trtc cannot honour, and trtc's KV block events grouped into the
publisher's calls (one per chain of stored blocks, one per run of removals)."""

import pytest

from trtc.dynamo.kv_events import publisher_calls
from trtc.dynamo.requests import finish_reason, logprob_fields, sampling_params
from trtc.errors import TrtcError
from trtc.runtime.messages import KvBlockEvent
from trtc.runtime.sampling_params import GuidedDecodingParams


def test_sampling_options_and_stop_conditions():
    p = sampling_params({"token_ids": [1, 2, 3],
                         "sampling_options": {"temperature": 0.7, "top_p": 0.9, "top_k": -1, "seed": 3, "n": 1,
                                              "presence_penalty": None},
                         "stop_conditions": {"max_tokens": 12, "stop_token_ids_hidden": [2, 7],
                                             "stop_token_ids_visible": [7]},
                         "output_options": {"logprobs": 2}}, max_seq_len=64)
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens) == (0.7, 0.9, 0, 3, 12)
    assert p.stop_token_ids == [[2]] and p.end_id is None
    assert p.logprobs and p.top_logprobs == 2 and p.prompt_logprobs is None
    p = sampling_params({"token_ids": [1] * 10, "stop_conditions": {"ignore_eos": True, "stop_token_ids_hidden": [2]}},
                        max_seq_len=64)
    assert p.end_id == -1 and p.stop_token_ids == [] and p.max_tokens == 54 and not p.logprobs  # the rest of the context
    p = sampling_params({"token_ids": [1], "sampling_options": {"guided_decoding": {"choice": ["yes", "no"]}}}, 64)
    assert p.guided_decoding == GuidedDecodingParams(choice=("yes", "no"))


@pytest.mark.parametrize("request_, match", [
    ({"sampling_options": {"n": 2}}, "one sequence per request"),
    ({"sampling_options": {"use_beam_search": True}}, "one sequence per request"),
    ({"stop_conditions": {"min_tokens": 4}}, "min_tokens is not supported"),
    ({"sampling_options": {"top_p": 0}}, "top_p must be"),
])
def test_what_trtc_cannot_honour_is_refused(request_, match):
    with pytest.raises(TrtcError, match=match):
        sampling_params({"token_ids": [1, 2], **request_}, 64)


def test_finish_reasons_and_logprobs():
    assert [finish_reason(r) for r in ("end_id", "stop_words", "stop", "length", "cancelled")] == \
        ["stop", "stop", "stop", "length", "cancelled"]
    fields = logprob_fields([-0.5], [{9: -0.1, 4: -0.5}], [4], lambda t: f"<{t}>")
    assert fields["log_probs"] == [-0.5]
    assert fields["top_logprobs"] == [[{"rank": 2, "token_id": 4, "token": "<4>", "logprob": -0.5},
                                       {"rank": 1, "token_id": 9, "token": "<9>", "logprob": -0.1},
                                       {"rank": 2, "token_id": 4, "token": "<4>", "logprob": -0.5}]]


def test_block_events_grouped_into_publisher_calls():
    events = [KvBlockEvent(True, 11, None, [1, 2]), KvBlockEvent(True, 12, 11, [3, 4]),
              KvBlockEvent(True, 21, 5, [7, 8]),  # another chain
              KvBlockEvent(False, 30, None, []), KvBlockEvent(False, 31, None, []),
              KvBlockEvent(True, 13, 12, [5, 6])]
    assert publisher_calls(events) == [
        ("publish_stored", {"token_ids": [1, 2, 3, 4], "num_block_tokens": [2, 2], "block_hashes": [11, 12],
                            "parent_hash": None}),
        ("publish_stored", {"token_ids": [7, 8], "num_block_tokens": [2], "block_hashes": [21], "parent_hash": 5}),
        ("publish_removed", {"block_hashes": [30, 31]}),
        ("publish_stored", {"token_ids": [5, 6], "num_block_tokens": [2], "block_hashes": [13], "parent_hash": 12}),
    ]
