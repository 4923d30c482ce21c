"""OpenAI protocol models (pydantic) for /v1/completions, /v1/chat/completions and /v1/models.

Field names and defaults follow the OpenAI API; the extensions are named as vLLM names them
(`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`). Ranges are checked here, so a bad
value is a 400 that names the field before anything reaches the engine. The fields declared here are the
honoured ones; the others OpenAI defines are harmless or refused (trtc/serve/fields.py).
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trtc.runtime.sampling_params import MAX_TOP_LOGPROBS, GuidedDecodingParams, SamplingParams
from trtc.serve.structured import guided_decoding_of


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="allow")  # undeclared fields: sorted by trtc/serve/fields.py

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    logit_bias: dict[str, float] | None = None  # {token id: bias in [-100, 100]}
    # vLLM's extensions
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0
    ignore_eos: bool = False
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # each prompt token's logprob
    stop_token_ids: list[int] | None = None
    # structured output: OpenAI's response_format, vLLM's guided_* extensions (trtc/serve/structured.py)
    response_format: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def guided_decoding(self) -> GuidedDecodingParams | None:
        return guided_decoding_of(self)

    def sampling_params(self, max_tokens: int, logprobs: bool, seed_offset: int = 0,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=None if self.top_k in (None, -1) else self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=None if self.seed is None else self.seed + seed_offset,
            end_id=-1 if self.ignore_eos else None, stop=[s for s in stop if s], logprobs=logprobs,
            stop_token_ids=list(self.stop_token_ids or []), logit_bias=self.logit_bias,
            top_logprobs=self.requested_top_logprobs() if logprobs else 0, guided_decoding=self.guided_decoding(),
            prompt_logprobs=prompt_logprobs,
        )

    def requested_top_logprobs(self) -> int:
        return 0

    def requested_prompt_logprobs(self) -> int | None:
        return self.prompt_logprobs

    @model_validator(mode="after")
    def _prompt_logprobs_not_streamed(self):
        if self.stream and self.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs are not available with stream true (as in vLLM); pass stream false")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # 0 with echo: score the prompt, generate nothing
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # N: the N most likely tokens too

    def requested_top_logprobs(self) -> int:
        return self.logprobs or 0

    def requested_prompt_logprobs(self) -> int | None:
        """The top N of the prompt's logprobs to compute: for echo with logprobs, and prompt_logprobs."""
        wanted = [n for n in (self.logprobs if self.echo else None, self.prompt_logprobs) if n is not None]
        return max(wanted) if wanted else None

    @model_validator(mode="after")
    def _zero_tokens_need_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: it needs echo true (to score the prompt); "
                             "pass max_tokens >= 1 or echo true")
        if self.max_tokens == 0 and self.stream:
            raise ValueError("max_tokens 0 (scoring the prompt) does not stream; pass stream false")
        return self

    @model_validator(mode="after")
    def _prompts_not_empty(self):
        p = self.prompt
        if p == "" or p == [] or (isinstance(p, list) and any(x == [] or x == "" for x in p)):
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # with logprobs: N most likely too
    add_generation_prompt: bool = True  # vLLM's extension
    chat_template_kwargs: dict | None = None  # vLLM's extension: extra variables for the chat template
    reasoning_effort: str | None = None  # passed to the chat template (as vLLM does), for templates that read it
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None  # "auto" (the default with tools), "none", "required", a named function
    parallel_tool_calls: bool = True  # False: at most one call (exactly one under tool_choice "required")

    def guided_decoding(self) -> GuidedDecodingParams | None:
        return guided_decoding_of(self, self.tools, self.tool_choice, self.parallel_tool_calls)

    def template_kwargs(self) -> dict:
        extra = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            extra.setdefault("reasoning_effort", self.reasoning_effort)
        return extra

    @property
    def forced_tool_choice(self) -> bool:
        return bool(self.tools) and (self.tool_choice == "required" or isinstance(self.tool_choice, dict))

    def requested_top_logprobs(self) -> int:
        return self.top_logprobs or 0

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "trtc"
    max_model_len: int | None = None
    parent: str | None = None  # a LoRA adapter's base model


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
