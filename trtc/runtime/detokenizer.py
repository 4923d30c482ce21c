"""Incremental detokenization of one request's output, with stop strings held back.

The prefix-offset way of vLLM and TGI: each new token is decoded together with a few tokens before
it (the prefix window, which starts in the prompt), and the text it adds is what that decode has
beyond the window's old text. So a word keeps its leading space ("The dog" + " was"), a character
split over several byte tokens is released only when complete (no U+FFFD mid-stream), and the cost
of a token is a decode of a handful of tokens, not of the whole output.

Stop strings: text that could be the start of a stop string is held back until the next tokens say
whether it is one, so a streamed delta never reaches past a stop string; once one is found, the text
is cut before it and the request is done.
"""

from __future__ import annotations

from collections.abc import Sequence

# Prompt tokens decoded before the first output token: enough for the tokenizer to place the space.
PREFIX_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class Detokenizer:
    """Incremental detokenization of one request's output (the prefix-offset way of vLLM/TGI), with
    stop strings held back so streamed text never runs past a possible stop string.

    `push(new_ids)` returns the newly released text; `flush()` releases the rest at the end of the
    request. The deltas join to `text`, which equals the HF decode of prompt + output less the decode
    of the prompt (cut before the first stop string, if one is hit).
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = (),
                 skip_special_tokens: bool = True) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's `tokenizers.Tokenizer`
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self._decode_ids = backend.decode  # what the HF decode returns then, without its Python layers
        else:
            self._decode_ids = tokenizer.decode
        self._skip_special = skip_special_tokens
        # The tokens from the prefix offset on: [prefix_offset, read_offset) are decoded already
        # (their text is `_prefix_text`), [read_offset, end) are not yet.
        self._window: list[int] = [int(t) for t in prompt_ids[-PREFIX_TOKENS:]]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        self._stop = [s for s in stop if s]
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._held = ""  # decoded text not released yet: it may be the start of a stop string
        self._text = ""
        self._stopped = False

    @property
    def text(self) -> str:
        """All released text so far (cut before the stop string once one is hit)."""
        return self._text

    @property
    def stopped(self) -> bool:
        """A stop string was found: `text` is final, cut before it."""
        return self._stopped

    def push(self, token_ids: Sequence[int]) -> str:
        """Add new output tokens; return the newly released text."""
        if self._stopped or not token_ids:
            return ""
        self._window.extend(map(int, token_ids))
        return self._release(self._decode_new(final=False), final=False)

    def flush(self) -> str:
        """End of the request: release the held-back text (and an unfinished character, as U+FFFD,
        as a whole decode shows it). Returns the delta."""
        if self._stopped:
            return ""
        return self._release(self._decode_new(final=True), final=True)

    # Internals ------------------------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids, skip_special_tokens=self._skip_special) if ids else ""

    def _decode_new(self, final: bool) -> str:
        """Text of the tokens past the read offset; "" while the last character is unfinished."""
        if self._read == len(self._window):
            return ""
        new_text = self._decode(self._window)
        if len(new_text) <= len(self._prefix_text) or (new_text.endswith(REPLACEMENT_CHAR) and not final):
            return ""  # nothing printable yet (a skipped special token, or a character still to complete)
        delta = new_text[len(self._prefix_text):]
        # The decoded tokens become the new prefix window; older tokens are dropped.
        self._window = self._window[self._read:]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        return delta

    def _release(self, delta: str, final: bool) -> str:
        held = self._held + delta
        if self._stop:
            hits = [i for i in (held.find(s) for s in self._stop) if i >= 0]
            if hits:  # earliest stop string: the text ends before it
                out = held[: min(hits)]
                self._held, self._stopped = "", True
                self._text += out
                return out
        keep = 0 if final else self._stop_prefix_len(held)
        out, self._held = held[: len(held) - keep], held[len(held) - keep:]
        self._text += out
        return out

    def _stop_prefix_len(self, held: str) -> int:
        """Length of the longest end of `held` that begins some stop string (so may become one)."""
        for n in range(min(len(held), self._max_stop - 1), 0, -1):
            tail = held[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0
