"""`SamplingParams`: how one request is decoded. Field names follow the TensorRT-LLM / vLLM LLM API.

The default is greedy decoding (TensorRT-LLM's default): a request samples only when it sets one of
`temperature`, `top_k`, `top_p`, `min_p` to something other than greedy (temperature 0 or top_k 1).
An unset `temperature` means 1.0 when the request samples.

`guided_decoding` constrains the output to a JSON schema, any JSON object, a regex, an EBNF grammar
or a list of choices (vLLM's `GuidedDecodingParams`, TensorRT-LLM's `guided_decoding`); the runtime
compiles it with xgrammar (trtc/runtime/guided_decoding.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real

MAX_TOP_LOGPROBS = 20  # OpenAI's limit, and vLLM's default max_logprobs


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_range(name: str, value, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise `ValueError('<name> must be in <range>, got <value>')` unless lo <(=) value <(=) hi."""
    if hi == math.inf:
        allowed = f"{'>' if lo_open else '>='} {lo:g}"
    else:
        allowed = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    ok = isinstance(value, Real) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_int(name: str, value, lo: int) -> None:
    if not _is_int(value) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def _normalize_stop_token_ids(value) -> list[list[int]]:
    """[1, 2] → [[1], [2]] (one-token sequences); [[1, 2], 3] → [[1, 2], [3]]."""
    if value is None:
        return []
    if _is_int(value):
        value = [value]
    sequences = []
    for entry in value:
        seq = [entry] if _is_int(entry) else list(entry)
        if not seq or not all(_is_int(t) and t >= 0 for t in seq):
            raise ValueError(
                f"stop_token_ids entries must be non-empty sequences of token ids >= 0, got {entry!r}"
            )
        sequences.append([int(t) for t in seq])
    return sequences


MAX_LOGIT_BIAS = 100.0  # OpenAI's range: [-100, 100]


def _normalize_logit_bias(value) -> dict[int, float] | None:
    """{token id (int, or its decimal text as OpenAI's JSON sends it): bias} -> {int: float}; None or {} -> None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"logit_bias must map token ids to biases in [-100, 100], got {type(value).__name__}")
    out = {}
    for key, bias in value.items():
        token = key if _is_int(key) else int(key) if isinstance(key, str) and key.strip().isdigit() else None
        if token is None or token < 0:
            raise ValueError(f"logit_bias key {key!r} is not a token id (an integer >= 0)")
        _check_range(f"logit_bias[{key!r}]", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
        out[int(token)] = float(bias)
    return out or None


@dataclass(frozen=True, slots=True)
class GuidedDecodingParams:
    """One constraint on the output, exactly one field set (vLLM's names). Whether the schema,
    regex or grammar compiles is checked when the request is added (TrtcError with the reason)."""

    json: str | dict | None = None  # a JSON schema (text or dict): the output is a JSON value it validates
    json_object: bool = False  # the output is any JSON object
    regex: str | None = None  # the output matches this regex (whole output)
    grammar: str | None = None  # an EBNF grammar (xgrammar's GBNF dialect; the start rule is `root`)
    choice: tuple[str, ...] | None = None  # the output is one of these strings

    def __post_init__(self) -> None:
        if self.choice is not None:
            if isinstance(self.choice, str) or not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise ValueError(f"guided_decoding choice must be a non-empty list of strings, got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(f"guided_decoding json must be a JSON schema (a dict or its text), got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"guided_decoding {name} must be a non-empty string, got {value!r}")
        set_ = [name for name in ("json", "json_object", "regex", "grammar", "choice") if getattr(self, name) not in (None, False)]
        if len(set_) != 1:
            raise ValueError(
                "guided_decoding takes exactly one of json, json_object, regex, grammar, choice; "
                f"got {', '.join(set_) if set_ else 'none'}"
            )

    @property
    def kind(self) -> str:
        return next(n for n in ("json", "json_object", "regex", "grammar", "choice") if getattr(self, n) not in (None, False))


@dataclass(slots=True)
class SamplingParams:
    """How one request is decoded: greedy unless a sampling knob is set (see the module docstring).

    Args:
        max_tokens: tokens to generate at most (>= 1); `trtc run --max_output_len`.
        temperature: >= 0; 0 is greedy; unset means 1.0 when another knob samples.
        top_k: sample from the k most likely tokens; 0 is off, 1 is greedy.
        top_p: nucleus sampling, in (0, 1]; 1 is off.
        min_p: drop tokens less likely than min_p times the most likely one, in [0, 1]; 0 is off.
        repetition_penalty: > 0, HF's, over prompt and output tokens; 1 is off.
        presence_penalty: in [-2, 2], OpenAI's, over output tokens; 0 is off.
        frequency_penalty: in [-2, 2], OpenAI's, over output tokens; 0 is off.
        seed: seeds this request's own generator (`trtc run --random_seed`); None uses the device's.
        end_id: the token that ends generation; None is the model's EOS (any of them), -1 none.
        stop_token_ids: token sequences that end generation ([1, 2] means [[1], [2]]).
        stop: strings that end generation (`trtc run --stop_words`); the text is cut before the
            first one, and streamed text never shows it.
        logprobs: also return the log-probability of each generated token.
        logit_bias: {token id: bias in [-100, 100]} added to those logits before penalties, temperature and
            truncation (OpenAI's): -100 bans a token, +100 all but forces it. Logprobs stay the model's.
        top_logprobs: with logprobs, also the top_logprobs (0-20) most likely tokens of each step and
            their log-probabilities, from the model's distribution (log_softmax of its logits, before
            temperature, penalties and truncation; a grammar's mask applied), as vLLM returns them.
        prompt_logprobs: vLLM's: the log-probability of each prompt token given the tokens before it
            (None for the first) and its rank, with the prompt_logprobs (0-20) most likely tokens at
            that position; the same log_softmax as generated tokens. None: not computed. A request
            asking for them computes its whole prompt (it takes no prefix from the prefix cache).

    Invalid values raise ValueError naming the field, its allowed range and the value.
    """

    max_tokens: int = 32  # tokens to generate, >= 1
    temperature: float | None = None  # >= 0; 0 = greedy; None = 1.0 when sampling
    top_k: int | None = None  # >= 0; 0 = off; 1 = greedy
    top_p: float | None = None  # (0, 1]; 1 = off
    min_p: float | None = None  # [0, 1]; 0 = off
    repetition_penalty: float = 1.0  # > 0; HF semantics over prompt + output tokens
    presence_penalty: float = 0.0  # [-2, 2]; OpenAI semantics over output tokens
    frequency_penalty: float = 0.0  # [-2, 2]; OpenAI semantics over output tokens
    seed: int | None = None  # per-request generator; None = the device's default generator
    end_id: int | None = None  # None = the model's EOS (resolved by the runtime); -1 = never stop on a token
    stop_token_ids: list[list[int]] = field(default_factory=list)  # token sequences that stop
    stop: list[str] = field(default_factory=list)  # strings that stop (matched in the decoded text, cut before them)
    logprobs: bool = False  # return the log-probability of each generated token
    top_logprobs: int = 0  # with logprobs: the most likely tokens of each step too, 0-20
    guided_decoding: GuidedDecodingParams | None = None  # structured output: schema / regex / grammar / choice
    prompt_logprobs: int | None = None  # score the prompt: each token's logprob and rank, and the top N, 0-20
    logit_bias: dict[int, float] | None = None  # {token id: bias in [-100, 100]} added to the logits

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1)
        if self.temperature is not None:
            _check_range("temperature", self.temperature, 0.0, math.inf)
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 0)
        if self.top_p is not None:
            _check_range("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if self.min_p is not None:
            _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("repetition_penalty", self.repetition_penalty, 0.0, math.inf, lo_open=True)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.end_id is not None:
            _check_int("end_id", self.end_id, -1)
        _check_int("top_logprobs", self.top_logprobs, 0)
        if self.top_logprobs > MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, 0)
            if self.prompt_logprobs > MAX_TOP_LOGPROBS:
                raise ValueError(f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs}")
        self.stop_token_ids = _normalize_stop_token_ids(self.stop_token_ids)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        self.stop = stop
        self.logit_bias = _normalize_logit_bias(self.logit_bias)
        if isinstance(self.guided_decoding, dict):
            self.guided_decoding = GuidedDecodingParams(**self.guided_decoding)
        if self.guided_decoding is not None and not isinstance(self.guided_decoding, GuidedDecodingParams):
            raise ValueError(f"guided_decoding must be a GuidedDecodingParams, got {type(self.guided_decoding).__name__}")

    @property
    def is_greedy(self) -> bool:
        """Argmax decoding: temperature 0, or top_k 1, or no sampling knob set at all."""
        if self.temperature == 0 or self.top_k == 1:
            return True
        return all(v is None for v in (self.temperature, self.top_k, self.top_p, self.min_p))
