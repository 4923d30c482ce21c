"""Which request fields of OpenAI's schemas trtc honours, accepts as harmless, or refuses.

No field that changes the output is accepted and ignored. A request's fields are one of:

    honoured    a field of the endpoint's pydantic model (trtc/serve/protocol.py, responses.py)
    harmless    in OpenAI's schema, cannot change what trtc generates: accepted (HARMLESS)
    refused     in OpenAI's schema, changes the output, not implemented: a 400 naming it unless its value
                is the one that changes nothing (REFUSED: field -> that test)
    unknown     in no schema (another server's extension): logged as ignored, as vLLM does, so clients
                that send vendor fields still work
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pydantic import BaseModel

from trtc.serve.errors import APIError

log = logging.getLogger("trtc")

# OpenAI fields that only tag, store or bill a request; trtc stores nothing and has one tier.
HARMLESS = frozenset({
    "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "prompt_cache_retention",
    "include",  # responses: extra output fields asked for (trtc returns what it has)
})


def _unset(value, request) -> bool:
    return value in (None, False, [], {}, "")


# field -> (does this value change nothing?, what to do instead)
Refusal = tuple[Callable[[object, BaseModel], bool], str]
_COMMON: dict[str, Refusal] = {
    "audio": (_unset, "audio output is not supported; trtc generates text"),
    "modalities": (lambda v, r: v in (None, ["text"]), "only the 'text' modality is supported"),
    "prediction": (_unset, "predicted outputs (speculative decoding from a given text) are not supported"),
    "web_search_options": (_unset, "web search is not supported"),
    "verbosity": (lambda v, r: v in (None, "medium"), "verbosity is not supported; ask for length in the prompt"),
}
REFUSED: dict[str, dict[str, Refusal]] = {
    "completions": {
        "best_of": (lambda v, r: v is None or v == r.n, "best_of other than n is not supported; send n"),
        "suffix": (_unset, "suffix (fill in the middle) is not supported"),
    },
    "chat": {
        **_COMMON,
        "functions": (_unset, "functions is deprecated and not supported; send tools"),
        "function_call": (_unset, "function_call is deprecated and not supported; send tool_choice"),
    },
    "responses": {
        **_COMMON,
        "previous_response_id": (_unset, "responses are not stored (store is false on this server); "
                                          "send the whole conversation in input"),
        "conversation": (_unset, "conversations are not stored on this server; send the whole conversation in input"),
        "prompt": (_unset, "stored prompt templates are not supported; send input and instructions"),
        "background": (_unset, "background responses are not supported; send stream or wait for the response"),
        "truncation": (lambda v, r: v in (None, "disabled"), "truncation 'auto' is not supported; shorten the input"),
    },
}


def check_fields(req: BaseModel, endpoint: str) -> None:
    """A 400 naming the first refused field set to a value that would change the output; a log line for
    fields in no schema. `req` is validated with extra="allow": undeclared fields are its model_extra."""
    extra = req.model_extra or {}
    refused = REFUSED[endpoint]
    for name, value in extra.items():
        if name in refused:
            changes_nothing, why = refused[name]
            if not changes_nothing(value, req):
                raise APIError(400, f"{name}: {why}", name)
    unknown = sorted(n for n in extra if n not in refused and n not in HARMLESS)
    if unknown:
        log.warning("the following fields were present in the request but ignored: %s", ", ".join(unknown))
