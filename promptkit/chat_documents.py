"""Documents inside chat messages, so the server reuses their KV (``promptkit serve --kv-reuse``).

A chat request marks its documents by structure: every content part of a user
message but its last, and every user message directly followed by another user
message, is a document (a multi-turn chat alternates roles, so it has none).
The messages are rendered as usual (parts joined by blank lines); the spans of
the documents in the rendered prompt tell the engine which KV it may take from
its chunk store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .prompt import locate

PART_SEPARATOR = "\n\n"


class TextPart(BaseModel):
    """One text content part of a chat message (OpenAI's ``{"type": "text", "text": ...}``)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


def flatten(content: str | Sequence[TextPart]) -> str:
    """A message's content as one string (its parts joined by blank lines)."""
    return content if isinstance(content, str) else PART_SEPARATOR.join(p.text for p in content)


def chat_documents(messages: Sequence[Any]) -> list[str]:
    """The documents among ``messages`` (objects with ``role`` and ``content``), in order."""
    docs: list[str] = []
    for i, m in enumerate(messages):
        if m.role != "user":
            continue
        followed_by_user = i + 1 < len(messages) and messages[i + 1].role == "user"
        if isinstance(m.content, str):
            docs += [m.content] if followed_by_user else []
        else:
            docs += [p.text for p in (m.content if followed_by_user else m.content[:-1])]
    return [d for d in docs if d.strip()]


def chat_prompt(backend: Any, messages: Sequence[Any]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered prompt of ``messages`` and the character spans of their documents in it."""
    flat = [{"role": m.role, "content": flatten(m.content)} for m in messages]
    text = backend.apply_chat_template(flat)
    return text, locate(text, chat_documents(messages))
