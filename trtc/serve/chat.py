"""Chat messages → prompt text, with the tokenizer's chat template (or one given by --chat_template)."""

from __future__ import annotations

from pathlib import Path

from trtc.errors import TrtcError
from trtc.serve.errors import APIError
from trtc.serve.protocol import ChatMessage


def load_chat_template(path: str | Path | None) -> str | None:
    """The Jinja text of --chat_template FILE (None: use the tokenizer's own)."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise TrtcError(f"--chat_template {p} is not a file; pass a Jinja chat template file")
    return p.read_text()


def _content_text(message: ChatMessage) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"content part of type {part.get('type')!r} is not supported; send text parts",
                           "messages")
        texts.append(part["text"])
    return "".join(texts)


def render_chat(tokenizer, messages: list[ChatMessage], template: str | None, add_generation_prompt: bool,
                tools: list[dict] | None = None, template_kwargs: dict | None = None) -> str:
    """The prompt text for `messages`; a 400 when the model has no chat template."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; start the server with --chat_template FILE "
                            "or use /v1/completions", "messages")
    conversation = [{**m.model_dump(exclude_none=True), "content": _content_text(m)} for m in messages]
    try:
        return tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, tools=tools or None,
                                             **(template_kwargs or {}))
    except Exception as e:  # a template that rejects the conversation (roles out of order, say)
        raise APIError(400, f"the chat template could not render these messages: {e}", "messages") from None
