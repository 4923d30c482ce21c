"""What generation returns (the field names of TensorRT-LLM's and vLLM's LLM API)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]  # generated tokens only
    finish_reason: str | None = None  # end_id | stop_words | stop | length | cancelled | error
    logprobs: list[float] | None = None  # of each generated token, when SamplingParams.logprobs
    top_logprobs: list[dict[int, float]] | None = None  # each step's most likely tokens, when asked for


def new_completion(params) -> CompletionOutput:
    """The empty output of a request with SamplingParams `params`: logprob lists where asked for."""
    return CompletionOutput("", [], None, [] if params.logprobs else None,
                            [] if params.logprobs and params.top_logprobs else None)


@dataclass
class Logprob:
    """One token's log-probability at one position (vLLM's): its rank in the distribution (1: the
    most likely) and, once the frontend decodes it, its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per prompt position: None for the first token, else {token id: Logprob}, the prompt's own token
# first, then the most likely ones (vLLM's PromptLogprobs).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    error: str | None = None  # why the request was rejected (it then has finish_reason "error")
    prompt_logprobs: PromptLogprobs | None = None  # when SamplingParams.prompt_logprobs, with the first token
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache, known once scheduled

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclass
class TokenEvent:
    """One step's news for one request: a new token, and the finish reason if it ended."""

    request_id: int
    token_id: int | None  # None when the request ended without a token (cancelled)
    logprob: float | None
    finish_reason: str | None
    top_logprobs: dict[int, float] | None = None  # token id -> logprob, most likely first, when asked for
    error: str | None = None  # why the request failed (finish reason "error")
    # On a request's first event only: its prompt's logprobs (when asked for) and its prompt tokens
    # that came from the prefix cache (None if it ended before it was scheduled).
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int | None = None
