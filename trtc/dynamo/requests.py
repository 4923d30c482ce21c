"""Dynamo's request and response shapes, to and from trtc's (no Dynamo import: the pure mapping).

A Dynamo request carries `token_ids`, `sampling_options` (temperature, top_p, top_k, min_p,
penalties, seed, guided_decoding), `stop_conditions` (max_tokens, ignore_eos, stop_token_ids_hidden /
_visible, min_tokens) and `output_options` (logprobs, prompt_logprobs). Stop strings are the
frontend's (it detokenizes), so they are not passed to the engine.
"""

from __future__ import annotations

from typing import Any

from trtc.errors import TrtcError
from trtc.runtime.sampling_params import GuidedDecodingParams, SamplingParams

# trtc's finish reasons -> Dynamo's (the OpenAI ones)
FINISH_REASONS = {"end_id": "stop", "stop_words": "stop", "stop": "stop", "length": "length",
                  "cancelled": "cancelled", "error": "error"}
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed")


def _guided(spec: dict[str, Any] | None) -> GuidedDecodingParams | None:
    """Dynamo's guided_decoding (json schema, regex, grammar or choice) as trtc's."""
    if not spec:
        return None
    choice = spec.get("choice")
    fields = {"json": spec.get("json"), "regex": spec.get("regex"), "grammar": spec.get("grammar"),
              "choice": tuple(choice) if choice else None}
    fields = {k: v for k, v in fields.items() if v is not None}
    return GuidedDecodingParams(**fields) if fields else None


def sampling_params(request: dict[str, Any], max_seq_len: int) -> SamplingParams:
    """The SamplingParams of a Dynamo request; TrtcError names a field trtc cannot honour or a bad value."""
    prompt = request.get("token_ids") or []
    sampling = {k: v for k, v in (request.get("sampling_options") or {}).items() if v is not None}
    stop = {k: v for k, v in (request.get("stop_conditions") or {}).items() if v is not None}
    output = request.get("output_options") or {}
    if sampling.get("n", 1) != 1 or sampling.get("best_of", 1) not in (None, 1) or sampling.get("use_beam_search"):
        raise TrtcError("a Dynamo worker of trtc runs one sequence per request (n, best_of 1, no beam search); "
                        "send n requests instead")
    if stop.get("min_tokens"):
        raise TrtcError("min_tokens is not supported by trtc's engine; leave it unset")
    kwargs = {k: sampling[k] for k in SAMPLING_FIELDS if k in sampling}
    if "top_k" in kwargs and kwargs["top_k"] < 0:  # vLLM's -1: off
        kwargs["top_k"] = 0
    max_tokens = stop.get("max_tokens") or max(1, max_seq_len - len(prompt))
    hidden = set(stop.get("stop_token_ids_hidden") or []) - set(stop.get("stop_token_ids_visible") or [])
    logprobs, prompt_logprobs = output.get("logprobs"), output.get("prompt_logprobs")
    try:
        return SamplingParams(
            max_tokens=int(max_tokens), end_id=-1 if stop.get("ignore_eos") else None,
            stop_token_ids=[] if stop.get("ignore_eos") else sorted(hidden),
            logprobs=logprobs is not None, top_logprobs=int(logprobs or 0),
            prompt_logprobs=None if prompt_logprobs is None else int(prompt_logprobs),
            guided_decoding=_guided(sampling.get("guided_decoding")), **kwargs,
        )
    except ValueError as e:
        raise TrtcError(str(e)) from e


def finish_reason(reason: str) -> str:
    return FINISH_REASONS.get(reason, reason)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None) -> dict[str, Any]:
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        u["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return u


def logprob_fields(logprobs: list[float], top: list[dict[int, float]] | None, token_ids: list[int],
                   token_text) -> dict[str, Any]:
    """A chunk's `log_probs` (one per token) and, when asked for, `top_logprobs` (per token: the chosen
    token, rank 1 .. of the most likely ones). token_text(id) -> its text."""
    fields: dict[str, Any] = {"log_probs": list(logprobs)}
    if top is not None:
        positions = []
        for tid, lp, alternatives in zip(token_ids, logprobs, top):
            position = [{"rank": None, "token_id": tid, "token": token_text(tid), "logprob": lp}]
            position += [{"rank": r, "token_id": t, "token": token_text(t), "logprob": v}
                         for r, (t, v) in enumerate(alternatives.items(), 1)]
            for p in position[1:]:
                if p["token_id"] == tid:
                    position[0]["rank"] = p["rank"]
            positions.append(position)
        fields["top_logprobs"] = positions
    return fields
