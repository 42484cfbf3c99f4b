"""Chat prompts that travel to the server's chat endpoint as messages.

The LM facade renders a chat prompt to text before it reaches a backend. When the backend has
no tokenizer to apply the model's chat template with, it "renders" the messages into a tagged
JSON string instead (:func:`encode_chat`), and recognizes it on the way out (:func:`decode_chat`)
to send them to ``/v1/chat/completions``, where the server applies the template. Text the
facade appends after it (a prompt's answer prefix) is the start of the assistant's turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# NUL never occurs in JSON text (json.dumps escapes it), so the tags cannot be spoofed by the messages.
CHAT_TAG = "\x00promptkit-chat\x00"


@dataclass(frozen=True)
class ChatPrompt:
    """Messages for a chat endpoint, and the start of the assistant's reply (``""`` for none)."""

    messages: list[dict[str, str]]
    assistant_prefix: str = ""


def encode_chat(messages: list[dict[str, str]]) -> str:
    """The messages as a tagged string the facade can carry like rendered text."""
    return CHAT_TAG + json.dumps(messages, ensure_ascii=False) + CHAT_TAG


def decode_chat(text: object) -> ChatPrompt | None:
    """The chat prompt carried by ``text``, or None when it is plain text (or token ids)."""
    if not isinstance(text, str) or not text.startswith(CHAT_TAG):
        return None
    end = text.find(CHAT_TAG, len(CHAT_TAG))
    if end < 0:
        return None
    return ChatPrompt(json.loads(text[len(CHAT_TAG):end]), text[end + len(CHAT_TAG):])
