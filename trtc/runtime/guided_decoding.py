"""Guided decoding (structured output) with xgrammar: a request's grammar masks its logits row.

One `GuidedDecoder` per engine, built with the first guided request: xgrammar's TokenizerInfo from the
engine's tokenizer (once), and its GrammarCompiler, whose cache compiles a schema / regex / grammar
once however many requests use it. Each guided request holds a GrammarMatcher; each step:

    fill(request_ids)   CPU: the token bitmask of every guided row (xgrammar, threads over the batch);
                        called after the forward is launched, so on a GPU it overlaps the step
    apply(logits)       disallowed tokens' logits -> -inf in place, on the logits' device, before
                        sampling: every sampling mode, penalty and stop rule then works unchanged
    advance(rid, tok)   the matcher accepts the sampled token; a terminated grammar ends the request "stop"

The mask is applied to the logits the step returns, outside the decode CUDA graphs: the graphs are
replayed as without a grammar. A step in which no request has a grammar does none of this.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import xgrammar as xgr

from trtc.errors import TrtcError
from trtc.runtime.sampling_params import GuidedDecodingParams

log = logging.getLogger("trtc")


@dataclass(slots=True)
class TokenBitmask:
    """One step's masks: bitmask rows [S, ceil(V/32)] int32 on the logits' device, and the rows (of the
    step's sampled requests) that have a grammar."""

    bitmask: torch.Tensor
    rows: list[int]
    vocab_size: int

    def apply(self, logits: torch.Tensor) -> None:
        # logits: [S, V] f32, modified in place
        xgr.apply_token_bitmask_inplace(logits, self.bitmask, vocab_size=self.vocab_size, indices=self.rows)


def choice_grammar(choices: Sequence[str]) -> str:
    """EBNF whose strings are exactly `choices` (JSON string literals are xgrammar EBNF literals)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _xgrammar_reason(error: Exception) -> str:
    """xgrammar's message without its log prefix ('[01:48:02] /project/cpp/x.cc:94: ', 'Check failed: ...')."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)
    text = re.sub(r"^Check failed: .*? is false: ", "", text)
    return text.split(". The JSON string is:")[0]


class GuidedDecoder:
    """The engine's grammar compiler and the matchers of its running guided requests."""

    def __init__(self, tokenizer, vocab_size: int, device: torch.device, max_batch_size: int) -> None:
        # vocab_size: the model's (logits width); ids the tokenizer lacks are never allowed
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, cache_enabled=True)
        self.matchers: dict[int, xgr.GrammarMatcher] = {}
        self._batch = xgr.BatchGrammarMatcher()
        # [max_batch_size, ceil(V/32)] int32 on the host (pinned on a GPU machine: an async copy)
        self._bitmask = xgr.allocate_token_bitmask(max_batch_size, vocab_size)
        if self.device.type == "cuda":
            self._bitmask = self._bitmask.pin_memory()

    # Requests -------------------------------------------------------------------------------------
    def compile(self, params: GuidedDecodingParams) -> xgr.CompiledGrammar:
        """The compiled grammar (xgrammar's cache: compiled once per distinct constraint). Thread-safe.
        Raises TrtcError naming what did not compile and why.

        JSON is compact with the standard separators (", ", ": "; xgrammar's any_whitespace=False): with
        free whitespace between tokens a model can emit whitespace until max_tokens (a random model
        does so in most samples)."""
        kind = params.kind
        try:
            if kind in ("json", "json_object"):
                schema = params.json if kind == "json" else {"type": "object"}
                return self.compiler.compile_json_schema(schema, any_whitespace=False)
            if kind == "regex":
                return self.compiler.compile_regex(params.regex)
            if kind == "grammar":
                return self.compiler.compile_grammar(params.grammar)
            return self.compiler.compile_grammar(choice_grammar(params.choice))
        except Exception as e:  # xgrammar raises RuntimeError / ValueError / its InvalidJSONError
            reason = _xgrammar_reason(e)
            what = {"json": "JSON schema", "grammar": "EBNF grammar"}.get(kind, kind)
            raise TrtcError(f"guided_decoding: the {what} does not compile: {reason}") from None

    def add(self, request_id: int, params: GuidedDecodingParams, stop_token_ids: Sequence[int]) -> None:
        """Start a matcher for the request. stop_token_ids: the tokens that end it (its end_id and
        single-token stops): allowed once the grammar is complete; with none, the request ends as soon
        as the grammar is complete."""
        self.matchers[request_id] = xgr.GrammarMatcher(
            self.compile(params),
            override_stop_tokens=list(stop_token_ids) or None,
            terminate_without_stop_token=not stop_token_ids,
        )

    def remove(self, request_id: int) -> None:
        self.matchers.pop(request_id, None)

    # The step -------------------------------------------------------------------------------------
    def fill(self, request_ids: Sequence[int]) -> TokenBitmask | None:
        """The masks of the step's sampled requests (request_ids in row order), on the device;
        None when none of them has a grammar."""
        rows = [i for i, rid in enumerate(request_ids) if rid in self.matchers]
        if not rows:
            return None
        host = self._bitmask[: len(request_ids)]
        self._batch.batch_fill_next_token_bitmask([self.matchers[request_ids[i]] for i in rows], host, indices=rows)
        return TokenBitmask(host.to(self.device, non_blocking=True), rows, self.vocab_size)

    def advance(self, request_id: int, token: int, finish_reason: str | None) -> str | None:
        """Feed the request's sampled token to its matcher; returns the request's finish reason:
        "stop" once its grammar has terminated, else the scheduler's."""
        matcher = self.matchers.get(request_id)
        if matcher is None:
            return finish_reason
        if not matcher.accept_token(token):  # the mask allowed it, so only a broken mask gets here
            log.error("request %d: token %d is outside its grammar; the request is ended", request_id, token)
            return "error"
        return "stop" if matcher.is_terminated() else finish_reason
