"""Reasoning parsers: `<think>…</think>` -> `reasoning_content` (vLLM's `--reasoning-parser` names).

    deepseek_r1   DeepSeek-R1: the chat template opens `<think>` in the prompt, so the reply is reasoning
                  up to `</think>` (a leading `<think>` is dropped too); without `</think>` it is all reasoning
    qwen3         Qwen3: the reply carries both tags; a reply without `<think>` (thinking switched off) is
                  all content

As with the tool parsers, `parse_reasoning(text)` runs the stream over the whole text, so streamed
deltas add up to the non-streamed reply; a tag split across deltas is held back until it is whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from trtc.serve.text_stream import held_back

THINK, END_THINK = "<think>", "</think>"


@dataclass
class ReasoningDelta:
    reasoning_content: str = ""
    content: str = ""


class ReasoningStream:
    """feed() each text delta, finish() at the end of the output."""

    starts_in_reasoning = False  # the prompt opened <think> already

    def __init__(self) -> None:
        self.buffer = ""
        self.state = "reasoning" if self.starts_in_reasoning else "start"  # start | reasoning | after_think | content

    def feed(self, text: str) -> ReasoningDelta:
        self.buffer += text
        return self._drain(final=False)

    def finish(self) -> ReasoningDelta:
        return self._drain(final=True)

    def _drain(self, final: bool) -> ReasoningDelta:
        delta = ReasoningDelta()
        while self.buffer:
            if self.state == "after_think":  # the newlines after </think> are not content
                self.buffer = self.buffer.lstrip("\n")
                self.state = "content" if self.buffer else "after_think"
            elif self.state == "content":
                delta.content += self.buffer
                self.buffer = ""
            elif self.state == "start":  # does the reply open with <think>?
                head = self.buffer.lstrip()
                if head.startswith(THINK):
                    self.buffer = head[len(THINK) :]
                    self.state = "reasoning"
                elif final or (head and not THINK.startswith(head)):
                    self.state = self._without_think()
                else:
                    break
            else:  # reasoning until </think>
                if self.buffer.startswith(THINK):  # deepseek_r1 replies may repeat the opening tag
                    self.buffer = self.buffer[len(THINK) :]
                end = self.buffer.find(END_THINK)
                if end >= 0:
                    delta.reasoning_content += self.buffer[:end]
                    self.buffer = self.buffer[end + len(END_THINK) :]
                    self.state = "after_think"
                    continue
                keep = 0 if final else max(held_back(self.buffer, END_THINK), held_back(self.buffer, THINK))
                delta.reasoning_content += self.buffer[: len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep :]
                break
        return delta

    def _without_think(self) -> str:
        return "content"


class DeepSeekR1Stream(ReasoningStream):
    starts_in_reasoning = True


class Qwen3Stream(ReasoningStream):
    pass


REASONING_PARSERS: dict[str, type[ReasoningStream]] = {"deepseek_r1": DeepSeekR1Stream, "qwen3": Qwen3Stream}


def reasoning_stream(parser: str) -> ReasoningStream:
    if parser not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {parser!r}; choose one of {', '.join(REASONING_PARSERS)}")
    return REASONING_PARSERS[parser]()


def parse_reasoning(parser: str, text: str) -> tuple[str | None, str | None]:
    """(reasoning_content, content) of a whole reply; None where there is none."""
    stream = reasoning_stream(parser)
    d1, d2 = stream.feed(text), stream.finish()
    reasoning, content = d1.reasoning_content + d2.reasoning_content, d1.content + d2.content
    return reasoning or None, content or None
