"""Documents inside chat messages, so the server reuses their KV (``promptkit serve --kv-reuse``).

A chat request marks its documents by structure: every content part of a user
message but its last, and every user message directly followed by another user
message, is a document (a multi-turn chat alternates roles, so it has none).
The messages are rendered as usual (parts joined by newlines); the spans of
the documents in the rendered prompt tell the engine which KV it may take from
its chunk store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .prompt import locate


def _parts(content: str | list[dict[str, Any]] | None) -> list[str]:
    return [content or ""] if not isinstance(content, list) else [p["text"] for p in content]


def chat_documents(messages: Sequence[Any]) -> list[str]:
    """The documents among ``messages`` (objects with ``role`` and ``content``: a string or
    OpenAI text parts), in order."""
    docs: list[str] = []
    for i, m in enumerate(messages):
        if m.role != "user":
            continue
        followed_by_user = i + 1 < len(messages) and messages[i + 1].role == "user"
        parts = _parts(m.content)
        docs += parts if followed_by_user else parts[:-1]
    return [d for d in docs if d.strip()]


def document_spans(text: str, messages: Sequence[Any]) -> list[tuple[int, int]]:
    """The character spans, in the rendered prompt ``text``, of the documents of ``messages``."""
    return locate(text, chat_documents(messages))
